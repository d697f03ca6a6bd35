"""Where the training stage puts its files in a run folder (export, eval and train.py's completion
record read them from there): names relative to the run folder, or to its checkpoints/ folder."""

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"                  # Lightning's save_last file: what training resumes from
WEIGHTS_FILE, CONFIG_FILE = "dsno_ema.safetensors", "dsno_config.json"    # the student's EMA weights, build config
TRAIN_TIME_FILE = "train_time.json"            # what training cost, for eval's report
VALIDATION_FILE = "validation.json"            # held-out vs train-subset scores per validation, the kept step
CHECKPOINT_WEIGHTS = f"{CHECKPOINT_DIR}/{WEIGHTS_FILE}"
CHECKPOINT_CONFIG = f"{CHECKPOINT_DIR}/{CONFIG_FILE}"
