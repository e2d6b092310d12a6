"""Finetune an export: instruction data (prompt/response .jsonl, loss on the response only),
a multi-task mixture, LoRA adapters or a freeze mode - the same Ray Train + DeepSpeed spine.

    python jobs/finetune.py init.export_dir=outputs/pretrain/export          # the built-in instruction set
    python jobs/finetune.py init.export_dir=outputs/pretrain/export data.input=my_instructions.jsonl \
        data.prompt_field=question data.response_field=answer
    python jobs/finetune.py init.export_dir=... peft.lora_rank=8                 # LoRA: adapters in export/adapter/
    python jobs/finetune.py init.export_dir=... peft.freeze=router_only
    python jobs/finetune.py init.export_dir=... \
        'tasks=[{name:code,dataset_dir:outputs/dataset,weight:0.3},{name:chat,dataset_dir:outputs/finetune/dataset,weight:0.7}]'

The model section comes from the export (model.* overrides given here still apply, e.g.
model.moe.capacity_factor=1.25). The data is prepared with the export's tokenizer into
data.dataset_dir (unless `tasks` names already prepared datasets), then trained into
run.output_dir (default outputs/finetune): tensorboard/, checkpoints/, export/.
"""
from __future__ import annotations


from jobs.common import ConfigError, command_line_overrides, job, model_from_export
from jobs.config import RootConfig
from jobs.prepare import run_prepare
from jobs.pretrain import run_pretraining, summary

# Applied before the user's overrides (which win).
FINETUNE_DEFAULTS = (
    "data.kind=instruction",
    "data.dataset_dir=outputs/finetune/dataset",
    "data.tokenizer=${init.export_dir}/tokenizer.json",
    "data.validation_fraction=0.1",
    "run.output_dir=outputs/finetune",
    "trainer.lr=1e-3",
    "trainer.warmup_steps=10",
    "trainer.max_steps=100",
    "trainer.eval_every=50",
    "trainer.checkpoint_every=50",
)


def run_finetune(config: RootConfig, overrides: list[str]):
    """Model from init.export_dir, data prepared with its tokenizer (single dataset), then train."""
    if not config.init.export_dir:
        raise ConfigError("init.export_dir must name the export to finetune (e.g. "
                          "init.export_dir=outputs/pretrain/export)")
    config.model = model_from_export(config, config.init.export_dir, overrides)
    if not config.tasks:
        run_prepare(config)
    return run_pretraining(config)


@job(defaults=FINETUNE_DEFAULTS)
def main(config: RootConfig) -> None:
    print(summary(run_finetune(config, command_line_overrides())))


if __name__ == "__main__":
    main()
