"""The hybrid PEFT search (config `search`): spaces (space.py), the plan from the config (plan.py)
and the Optuna study (study.py). Torch-free; only study.py imports optuna."""
