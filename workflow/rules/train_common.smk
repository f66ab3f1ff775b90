# Input functions of the training rules (train.smk), kept apart from the rules as `snakemake
# --lint` asks. The round plan (starting model, epochs, learning rate) is wsiscan.dag.round_plan.
# None of them reads train.rounds, so raising it re-runs only the new rounds.
TRAIN = config["train"]
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


def train_annotations():
    return [a for a in SAMPLES.loc[train_slides(), "annotation"] if a]


def train_round_inputs(wildcards):
    """Hard negatives of rounds < k and the starting model of round k (wsiscan.dag.round_plan)."""
    plan = dag.round_plan(config, int(wildcards.round))
    inputs = plan.inputs()
    if plan.init == "imagenet":
        inputs["imagenet_weights"] = config["model"]["imagenet_weights"]
    return inputs


def round_init_args(wildcards, input):
    """``--init-model`` (fine-tuning) or ``--imagenet-weights``, as the round plan says."""
    if "init_model" in input.keys():
        return ["--init-model", input.init_model]
    if "imagenet_weights" in input.keys():
        return ["--imagenet-weights", input.imagenet_weights]
    return []
