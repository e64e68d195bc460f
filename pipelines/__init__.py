"""The KFP side: the pipeline (the DAG), its parameters and their checks, the artifact helpers
and the run-local driver; the steps themselves are in ``components/``."""
