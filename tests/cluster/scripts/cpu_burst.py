"""A job that cannot run on a 0-CPU head: `--tasks` tasks that each hold a whole CPU.

Submitted by tests/cluster/test_local_autoscaling.py with our runtime_env, so the
tasks also prove that `moe_platform` reaches worker nodes through py_modules.
"""

import argparse
import time

import ray


@ray.remote(num_cpus=1)
def hold_cpu(seconds: float) -> tuple[str, str]:
    import moe_platform  # shipped by runtime_env py_modules, not installed on the node

    time.sleep(seconds)
    return ray.get_runtime_context().get_node_id(), moe_platform.__file__


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    ray.init()
    results = ray.get([hold_cpu.remote(args.seconds) for _ in range(args.tasks)])
    node_ids = sorted({node_id for node_id, _ in results})
    print(f"cpu_burst: {args.tasks} tasks ran on {len(node_ids)} node(s): {node_ids}")
    print(f"cpu_burst: moe_platform imported from {results[0][1]}")


if __name__ == "__main__":
    main()
