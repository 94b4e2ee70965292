"""YOLO-World (ultralytics' WorldModel): open-vocabulary YOLO detection, classes given as CLIP text embeddings.
Task: detection. Needs the optional extra `yolo` (pip install 'mixtune[yolo]'; ultralytics is AGPL-3.0).

A checkpoint is a folder:

    config.json      {"model_type": "yolo_world", "weights": "yolov8s-worldv2.pt",
                      "text_encoder": "/models/clip-vit-base-patch32", "imgsz": 640}
    yolov8s-worldv2.pt   ultralytics' own checkpoint (YOLOWorld("...pt") loads it unchanged)

ultralytics would download OpenAI's CLIP to embed class names; mixtune instead embeds them with the CLIP
text tower of the local `text_encoder` folder (transformers' CLIPModel: its projected EOS feature,
L2-normalised, which is what ultralytics' `clip:ViT-B/32` computes) and hands the embeddings to the model.
Phrases the weights already carry (`names` with their `txt_feats`, e.g. COCO's 80 in yolov8s-worldv2.pt) need
no text encoder at all. The text tower is frozen, as in YOLO-World's own training.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import torch

from mixtune.errors import MixtuneError
from mixtune.models.family import Family
from mixtune.models.tiny import seeded

INSTALL = "YOLO-World needs ultralytics (AGPL-3.0 licence): pip install 'mixtune[yolo]'"
DEFAULT_IMGSZ = 640
TINY_IMAGE_SIZE = 96
# yolov8-worldv2.yaml at a toy width: channels 8..32, one C2f block per stage, one attention head
TINY_SCALE = [0.33, 0.125, 256]
TINY_CLASSES = ("circle", "square", "triangle")
TEXT_WIDTH = 512  # the width every YOLO-World yaml reads (CLIP ViT-B/32's projection)


def require_ultralytics() -> None:
    if importlib.util.find_spec("ultralytics") is None:
        raise MixtuneError(INSTALL)
    keep_pil_open()


def keep_pil_open() -> None:
    """Undo ultralytics' process-wide replacement of PIL.Image.open (made when ultralytics.utils is imported).
    Its replacement answers an unreadable image by trying to pip-install pi-heif and raising ModuleNotFoundError
    instead of PIL's UnidentifiedImageError, which would turn mixtune's bad-image checks (a named error or a
    counted skip) into a crash, in every later task of the process too."""
    from PIL import Image
    from ultralytics.utils import patches

    original = getattr(patches, "_image_open", None)
    if original is not None and Image.open is getattr(patches, "image_open", None):
        Image.open = original


def read_folder_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if not isinstance(config.get("weights"), str):
        raise MixtuneError(f"{path}/config.json needs 'weights': the ultralytics .pt file (e.g. yolov8s-worldv2.pt)")
    return config


def text_encoder_path(path: str, config: dict) -> str | None:
    enc = config.get("text_encoder")
    return None if not enc else enc if os.path.isabs(enc) else os.path.join(path, enc)


def load_world(path: str):
    """(WorldModel in fp32 with trainable parameters, the folder's config) through ultralytics' own loader."""
    require_ultralytics()
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import WorldModel, load_checkpoint

    config = read_folder_config(path)
    weights = os.path.join(path, config["weights"])
    if not os.path.isfile(weights):
        raise MixtuneError(f"{path}/config.json names weights '{config['weights']}', which is not a file there")
    model, _ = load_checkpoint(weights)
    if not isinstance(model, WorldModel):
        raise MixtuneError(f"{weights} holds an ultralytics {type(model).__name__}, not a YOLO-World WorldModel")
    # the loss reads its gains (box, cls, dfl) as attributes; load_checkpoint leaves a plain dict
    model.args = get_cfg(overrides={k: v for k, v in dict(model.args).items() if k != "cfg"})
    for p in model.parameters():
        p.requires_grad_(True)
    model.mixtune_folder = {"imgsz": int(config.get("imgsz", DEFAULT_IMGSZ)),
                            "text_encoder": text_encoder_path(path, config)}
    return model.float(), config


def known_embeddings(model) -> dict[str, torch.Tensor]:
    """The phrases the weights carry embeddings for (ultralytics' `names` with `txt_feats`)."""
    names = getattr(model, "names", None) or {}
    feats = getattr(model, "txt_feats", None)
    if not isinstance(names, dict) or feats is None or feats.shape[-2] != len(names):
        return {}
    return {names[i]: feats.reshape(-1, feats.shape[-1])[k].float() for k, i in enumerate(sorted(names))}


@torch.no_grad()
def clip_text_embeddings(encoder_dir: str, phrases: list[str], batch: int = 256) -> torch.Tensor:
    """(len(phrases), dim) unit vectors: CLIP's projected EOS feature of each phrase (transformers' CLIPModel)."""
    from transformers import AutoTokenizer, CLIPModel

    try:
        tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
        clip = CLIPModel.from_pretrained(encoder_dir).eval()
    except OSError as e:
        raise MixtuneError(f"cannot load the CLIP text encoder '{encoder_dir}': {e}") from None
    out = []
    for start in range(0, len(phrases), batch):
        tokens = tokenizer(phrases[start: start + batch], padding=True, truncation=True, return_tensors="pt")
        feats = clip.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        out.append(torch.nn.functional.normalize(feats.float(), dim=-1))
    return torch.cat(out)


def phrase_embeddings(model, phrases) -> dict[str, torch.Tensor]:
    """phrase -> text embedding for every phrase: those the weights carry, the rest through the folder's CLIP."""
    known = known_embeddings(model)
    missing = list(dict.fromkeys(p for p in phrases if p not in known))
    if missing:
        encoder = model.mixtune_folder["text_encoder"]
        if encoder is None:
            raise MixtuneError(f"{len(missing)} phrases (e.g. '{missing[0]}') are not among the checkpoint's "
                               "classes, and its config.json names no 'text_encoder' (a CLIP folder) to embed them")
        known.update(zip(missing, clip_text_embeddings(encoder, missing)))
    dim = text_dim(model)
    some = next(iter(known.values()), None)
    if some is not None and some.shape[-1] != dim:
        raise MixtuneError(f"the text encoder's embeddings are {some.shape[-1]}-wide but the model reads {dim}-wide "
                           "ones: pair the weights with the CLIP they were trained with")
    return {p: known[p] for p in phrases}


def text_dim(model) -> int:
    return model.model[-1].cv4[0].norm.num_features if hasattr(model.model[-1].cv4[0], "norm") else \
        model.txt_feats.shape[-1]


def set_classes(model, names: list[str], embeddings: dict[str, torch.Tensor]) -> None:
    """What ultralytics' own set_classes does, with embeddings mixtune computed: the saved weights then
    predict these classes in plain ultralytics, no text encoder needed."""
    model.txt_feats = torch.stack([embeddings[n] for n in names])[None].float()
    model.model[-1].nc = len(names)
    model.names = dict(enumerate(names))


def save_world(model, output_dir: str, names: list[str] | None = None, embeddings: dict | None = None,
               state_dict: dict | None = None) -> str:
    """ultralytics' checkpoint shape (a dict holding the module) in fp32, so reloading gives equal outputs
    (ultralytics' own trainer halves it), plus mixtune's config.json."""
    from ultralytics import __version__

    os.makedirs(output_dir, exist_ok=True)
    saved = copy.deepcopy(model).float().cpu()
    if state_dict is not None:
        saved.load_state_dict(state_dict)
    saved.criterion = None
    if names:
        set_classes(saved, names, embeddings)
    else:  # training set the head's class count per batch: back to the classes the weights carry
        saved.model[-1].nc = saved.txt_feats.shape[-2]
    folder = saved.__dict__.pop("mixtune_folder", None) or {"imgsz": DEFAULT_IMGSZ, "text_encoder": None}
    args = dict(vars(saved.args)) if hasattr(saved.args, "__dict__") else dict(saved.args or {})
    saved.args = args
    for p in saved.parameters():
        p.requires_grad_(False)
    torch.save({"model": saved, "ema": None, "train_args": args, "version": __version__,
                "license": "AGPL-3.0 License (https://ultralytics.com/license)"}, os.path.join(output_dir, "model.pt"))
    encoder = folder["text_encoder"]
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump({"model_type": "yolo_world", "weights": "model.pt", "imgsz": folder["imgsz"],
                   "text_encoder": os.path.abspath(encoder) if encoder else None}, f, indent=1)
    return output_dir


def tiny_yaml() -> dict:
    """ultralytics' yolov8-worldv2.yaml at TINY_SCALE. Its text width stays 512 (CLIP ViT-B/32's): WorldModel
    builds itself with a 512-wide placeholder embedding."""
    from ultralytics.nn.tasks import yaml_model_load

    d = copy.deepcopy(yaml_model_load("yolov8-worldv2.yaml"))
    d.update(scales={"t": TINY_SCALE}, scale="t", nc=len(TINY_CLASSES))
    return d


def prior_biases(model, imgsz: int) -> None:
    """YOLOv8's own class-bias prior (Detect.bias_init: about 5 objects per image over each level's cells) in
    place of the contrastive head's -10, which ultralytics' training lifts with a warm-up bias rate of 0.1 that
    mixtune's optimiser does not have: a random tiny model would otherwise score under 1e-4 for hundreds of steps."""
    import math

    head = model.model[-1]
    for contrast, stride in zip(head.cv4, head.stride.tolist()):
        contrast.bias.data.fill_(math.log(5 / len(TINY_CLASSES) / (imgsz / stride) ** 2))


def build_tiny(output_dir: str) -> str:
    """A tiny CLIP (mixtune's, in text_encoder/) and a random-weight YOLO-World built from ultralytics' own yaml,
    saved as ultralytics saves one: it loads through the code path of a user's yolov8s-worldv2.pt."""
    require_ultralytics()
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import WorldModel

    from mixtune.models.clip import build_tiny as build_tiny_clip

    encoder = build_tiny_clip(os.path.join(output_dir, "text_encoder"), projection_dim=TEXT_WIDTH)
    seeded()
    feats = clip_text_embeddings(encoder, list(TINY_CLASSES))
    model = WorldModel(tiny_yaml(), nc=len(TINY_CLASSES), verbose=False)
    prior_biases(model, TINY_IMAGE_SIZE)
    model.args = get_cfg()
    model.mixtune_folder = {"imgsz": TINY_IMAGE_SIZE, "text_encoder": encoder}
    save_world(model, output_dir, list(TINY_CLASSES), dict(zip(TINY_CLASSES, feats)))
    with open(os.path.join(output_dir, "config.json")) as f:
        config = json.load(f)
    config["text_encoder"] = "text_encoder"  # relative: the tiny folder can move
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return output_dir


BACKBONE = ("model.[0-9].*",)  # layers 0-9 of every YOLOv8-World yaml

FAMILY = Family(
    name="yolo_world",
    model_types=("yolo_world",),
    vision=BACKBONE,
    projector=(),
    image_placeholder="",
    build_tiny=build_tiny,
    language=(),
    uses_chat_template=False,
    requires=("ultralytics", "pycocotools"),
    auto_class="",
    task="detection",
    # its layers are convolutions and ultralytics' own modules; full fine-tuning (or freeze_backbone) instead
    supports_lora=False,
    parts=(("backbone", BACKBONE), ("neck_head", ("*",))),
)
