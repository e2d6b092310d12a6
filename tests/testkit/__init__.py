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

smoke       SmokeRun, SMOKE_OVERRIDES      what the session's shared `make run` is and wrote
sweeps      InterruptedSweep, sweep_settings   the session's one jobs/tune.py sweep (interrupted,
                                          resumed) and its (base stage, tune section) in-process
xdist_units RayTestsOnOneWorker           `make test`'s xdist scheduler: every test that takes
                                          `ray_cluster` on one worker (one Ray), the rest beside it

Session fixtures (tests/conftest.py): `ray_cluster`, `job_env`, `deepspeed_ops`,
`smoke_run`, one tiny `make run` shared by every test that needs a trained run or its export, and
`interrupted_sweep`, one tiny Tune sweep shared by the Tune job's and the sweep's tests.

The budget: `make test` under 10 minutes on 2 cores, `make test-fast` under 3. Each Ray Train
run costs tens of seconds there, so a new feature's tests
- use `smoke_run` (or its export) when they need *a* trained model, never a run of their own;
- otherwise start at most one run of their own, in a module- or session-scoped fixture that
  all of the feature's assertions read (see tests/moe_platform/train/test_train_run.py);
- mark every test that runs a job or a Ray Train run `slow`;
- use tiny_model() shapes and a few steps; pure functions are tested without Ray;
- start subprocesses only through run_job/start_job (a hang fails with the job's output).
pytest prints the 25 slowest tests on every run: check them when you add one.
"""
