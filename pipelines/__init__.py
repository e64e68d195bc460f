"""KFP pipeline definitions (DAGs); the steps themselves are in ``components/``."""
