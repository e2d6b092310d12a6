# Makes jobs/conf a regular package. Hydra finds this config tree as the module `jobs.conf`;
# without this file that lookup works only through the editable install's import hook and
# fails ("Primary config module 'jobs.conf' not found") wherever the code is shipped as
# files: a Ray job's working_dir, or the cluster image's non-editable install.
