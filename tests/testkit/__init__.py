"""testkit: the one support package of the test suite (pytest puts tests/ on sys.path).

Write new tests against it instead of adding a factory or a `sys.path.insert` to a test file.
Import from the module (this package imports nothing, so tests/moe stays free of Ray):

    from testkit.models import tiny_model
    from testkit.processes import run_job

models      tiny_model(**changes)         the tiny MoE every test trains or serves; change any
                                          ModelConfig or MoEConfig field by name
            TINY_MODEL_OVERRIDES          the same model as Hydra command-line overrides
datasets    write_dataset(dir, ...)       a learnable dataset on the prepare job's contract
            write_corpus / write_jsonl / write_parquet / prose   small raw corpora
training    tiny_stage(dataset, out, ...) a few-step, one-worker StageConfig
            read_scalars / event_accumulator / read_json         read a run back
serving     deploy_for_test(export, port) the app on the session's Serve (unique name/route)
            ensure_serve_port, API_KEY, Served
processes   run_job(script, *overrides)   a jobs/<script> subprocess; a timeout fails the test
                                          with the job's last output instead of hanging
            start_job(script, ...)        a job in the background (RunningJob: wait_for(marker),
                                          wait(), kill()), its output drained, every wait bounded
            environment_without_ray()     proves a job failed before it reached Ray
deepspeed_ops  DeepSpeed's JIT-built CPU op: built once per session; a stale build lock is
                                          reported by name instead of hanging every 2-process test

Session fixtures (tests/conftest.py): `ray_cluster`, `job_env`, and `smoke_run`, one tiny
pretraining job shared by every test that needs a trained run or its export.
Mark a test `slow` when it runs a whole job (minutes): `make test-fast` skips those.
"""
