# Input functions and settings of the training rules (train.smk): kept apart from the rules as
# `snakemake --lint` asks. None of them reads train.rounds, so raising it re-runs only new rounds.
TRAIN = config["train"]
MINE = TRAIN["mine"]
TRAIN_GPU = 0 if TRAIN["device"] == "cpu" else 1


def train_slides():
    """Training slides with a tumour/normal label (split == train), in sheet order."""
    rows = SAMPLES[
        (SAMPLES["split"] == "train") & SAMPLES["label"].isin(["tumor", "normal"])
    ]
    return rows.index.tolist()


def train_slide_paths(wildcards):
    """Slide files of the training slides; stops the run when there are none to train on."""
    slides = train_slides()
    if not slides:
        raise WorkflowError(
            f"train.rounds is {TRAIN['rounds']} but the sample sheet has no training slides "
            "(split train, label tumor or normal): add some, set model.checkpoint to a trained "
            "model, or set train.rounds to 0"
        )
    return SAMPLES.loc[slides, "path"].tolist()


def train_slide_args(wildcards, input):
    """``--slide ID LABEL SLIDE MASK [ANNOTATION]`` per training slide."""
    args = []
    for sid in train_slides():
        row = SAMPLES.loc[sid]
        args += ["--slide", sid, row["label"], row["path"], f"results/{sid}/tissue.png"]
        if row["annotation"]:
            args.append(row["annotation"])
    return args


def train_annotations():
    return [a for a in SAMPLES.loc[train_slides(), "annotation"] if a]


def training_round(wildcards):
    k = int(wildcards.round)
    if k < 1:
        raise WorkflowError(f"training rounds are numbered from 1, got round{k}")
    return k


def finetunes(k):
    return k >= 2 and TRAIN["round_init"] == "finetune"


def train_round_inputs(wildcards):
    """Hard negatives of rounds < k; round k-1's model when fine-tuning, else ImageNet weights."""
    k = training_round(wildcards)
    inputs = {
        "hard_negatives": [
            f"results/train/round{j}/hard_negatives.h5" for j in range(1, k)
        ]
    }
    if finetunes(k):
        inputs["init"] = f"results/train/round{k - 1}/model.pt"
    elif config["model"]["imagenet_weights"]:
        inputs["imagenet"] = config["model"]["imagenet_weights"]
    return inputs


def round_epochs(wildcards):
    k = training_round(wildcards)
    return TRAIN["finetune_epochs"] if finetunes(k) else TRAIN["epochs"]


def round_lr(wildcards):
    k = training_round(wildcards)
    return TRAIN["lr"] * (TRAIN["finetune_lr_scale"] if finetunes(k) else 1.0)


def round_init_args(wildcards, input):
    if "init" in input.keys():
        return ["--init-model", input.init]
    if "imagenet" in input.keys():
        return ["--imagenet-weights", input.imagenet]
    return []
