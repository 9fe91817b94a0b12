"""Model factory: the built-in models (the seed's AlexNet, ResNet-18, VGG-11, a small CNN: no
pretrained weights, first conv rebuilt for the dataset's channels), any torchvision classification
model (`torchvision_model`), any timm model (`timm_model`), and any other `_target_` a user's model
YAML names (`make`), each adapted to the dataset's channels and classes (coupled_net.adapt) and
checked up front against its input size on the meta device (coupled_net.probe)."""

from __future__ import annotations

import difflib
import os
from urllib.parse import urlparse

import torch
import torchvision
from hydra.utils import instantiate
from torch import nn
from torchvision import models as tvm
from torchvision.models import WeightsEnum, get_model, get_model_weights

from .adapt import adapt_classifier, adapt_first_conv, first_conv, fit_classifier, head_layer
from .errors import ConfigError, one_line
from .extras import TIMM, install_hint
from .identity import model_name
from .probe import build_checked
from .targets import check_keys, keywords, locate


class SmallCNN(nn.Module):
    """Two conv blocks and an MLP head, laid out like torchvision's (features / avgpool /
    classifier) so `features.0` names the coupled layer as it does for AlexNet and VGG."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(2 * width * 7 * 7, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def _alexnet(in_channels: int, num_classes: int) -> nn.Module:
    model = tvm.alexnet(weights=None, num_classes=num_classes)
    model.features[0] = nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2)  # the seed's
    return model


def _resnet18(in_channels: int, num_classes: int) -> nn.Module:
    model = tvm.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def _vgg11(in_channels: int, num_classes: int) -> nn.Module:
    model = tvm.vgg11(weights=None, num_classes=num_classes)
    model.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
    return model


def _small_cnn(in_channels: int, num_classes: int, width: int = 32) -> nn.Module:
    return SmallCNN(in_channels, num_classes, width)


MODELS = {"alexnet": _alexnet, "resnet18": _resnet18, "vgg11": _vgg11, "small_cnn": _small_cnn}


def build_model(name: str, in_channels: int, num_classes: int, input_size: int, **options) -> nn.Module:
    """Build `name` for `in_channels`-channel images of `input_size` pixels and `num_classes`
    classes; refuses an input size the model cannot take (checked once per process, coupled_net.probe)."""
    if name not in MODELS:
        raise ConfigError("model", name, f"allowed: {', '.join(sorted(MODELS))}")
    if in_channels not in (1, 3):
        raise ConfigError("dataset.channels", in_channels, "allowed: 1 or 3")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError("dataset.num_classes", num_classes, "must be an integer >= 2")
    return build_checked(lambda load: MODELS[name](in_channels, num_classes, **options), in_channels, num_classes,
                          input_size, name, (BUILTIN, name, options))


# ---- any model config: torchvision and timm by name, or a user's own `_target_` --------------------

BUILTIN = "coupled_net.models.build_model"
TORCHVISION = "coupled_net.models.torchvision_model"
# coupled_net's own model keys: never passed to a foreign `_target_` that does not take them
RESERVED = ("input_size", "in_channels", "num_classes", "name")
# what an unknown torchvision name is answered with when no name is close to it
EXAMPLES = ("mobilenet_v3_small", "efficientnet_b0", "resnet18", "densenet121", "regnet_y_400mf", "convnext_tiny")
# torchvision models whose forward returns a namedtuple with auxiliary logits in training: built without them
AUX_LOGITS = ("googlenet", "inception_v3")
# torchvision models built for one input size: built for model.input_size (random weights only: the
# pretrained ones fix their size)
SIZE_KWARG = {"vit_": "image_size", "maxvit_": "input_size"}
# ...and the sizes they can be built for: a multiple of a ViT's patch (vit_b_16: 16), of 224 for MaxViT
# (7x7 attention windows on the map at 1/32 of the image); their pretrained weights fix one size
SIZE_MULTIPLE = {"vit_": (lambda arch: int(arch.rsplit("_", 1)[1]), "its patch size"),
                 "maxvit_": (lambda arch: 224, "7x7 attention windows at 1/32 of the image")}
BUILT_SIZE = 224  # what torchvision builds them for without image_size/input_size (a weights file's model)
WEIGHT_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin", ".ckpt", ".safetensors")


def _suggest(name: str, names: list[str], examples=()) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    return ", ".join(close or examples)


def _torchvision_weights(arch: str, weights):
    """None, a torchvision weights enum member whose file is in the torch hub cache, or a state_dict
    file's absolute path; ConfigError otherwise (nothing is ever downloaded)."""
    if weights is None:
        return None
    text = str(weights)
    path = os.path.abspath(os.path.expanduser(text))
    if os.path.isfile(path):
        return path
    if "/" in text or os.sep in text or text.endswith(WEIGHT_SUFFIXES):
        raise ConfigError("model.weights", weights, f"no such file: {path}")
    enum = get_model_weights(arch)
    member = text.rsplit(".", 1)[-1]  # IMAGENET1K_V1, or ResNet18_Weights.IMAGENET1K_V1 as torchvision spells it
    if member not in enum.__members__:
        raise ConfigError("model.weights", weights, f"not a weights name of torchvision {arch} "
                                                    f"({', '.join(enum.__members__)}) nor a state_dict file")
    chosen = enum[member]
    # where torch.hub.load_state_dict_from_url keeps it: <hub dir>/checkpoints/<the URL's file name>
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(chosen.url).path))
    if not os.path.isfile(cached):
        raise ConfigError("model.weights", weights, f"{cached} is not in the torch hub cache; nothing is downloaded "
                                                    f"here: copy {chosen.url} there, or give a state_dict file")
    return chosen


def _check_size(arch: str, input_size, weights, source) -> None:
    """Refuse a `model.input_size` a model built for one size cannot take, naming the size it needs: a
    multiple of its patch (random weights: built for model.input_size), or the one its weights fix."""
    rule = next((rule for prefix, rule in SIZE_MULTIPLE.items() if arch.startswith(prefix)), None)
    if rule is None or not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 1:
        return
    if source is not None:
        fixed = source.meta["min_size"][0] if isinstance(source, WeightsEnum) else BUILT_SIZE
        if input_size != fixed:
            raise ConfigError("model.input_size", input_size, f"{arch} with model.weights={weights} needs images of "
                                                              f"exactly {fixed} pixels, the size its weights fix")
        return
    try:
        multiple, why = rule[0](arch), rule[1]
    except ValueError:  # a name without its patch size: torchvision's own refusal stands
        return
    if input_size % multiple:
        below = input_size // multiple * multiple
        near = " or ".join(str(n) for n in (below, below + multiple) if n > 0)
        raise ConfigError("model.input_size", input_size, f"{arch} needs a multiple of {multiple} pixels ({why}), "
                                                          f"e.g. {near}")


def _load_state_dict_file(model: nn.Module, path: str, in_channels: int, name: str) -> None:
    """Load a state_dict file into a torchvision model built for this dataset's classes: the file's
    classifier is dropped where its class count differs, its first conv adapted where its channel
    count differs (a file saved from this project's adapted model fits as it is)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError("model.weights", path, f"not a state_dict torch.load can read: {one_line(e)}") from None
    for key in ("state_dict", "model"):  # training checkpoints wrap it
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError("model.weights", path, f"holds a {type(state).__name__}, not a state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    conv_path, conv = first_conv(model)
    kernel = state.get(f"{conv_path}.weight")
    if kernel is not None and kernel.shape[1] == in_channels != conv.in_channels:
        adapt_first_conv(model, in_channels, name, pretrained=False)
    own = model.state_dict()
    head_path = head_layer(model)[0]
    head_keys = {f"{head_path}.weight", f"{head_path}.bias"}
    state = {k: v for k, v in state.items() if not (k in head_keys and k in own and v.shape != own[k].shape)}
    missing = [k for k in own if k not in state and k not in head_keys and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    problems = [f"{what}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes", wrong)) if keys]
    if problems:
        raise ConfigError("model.weights", path, f"does not fit torchvision {name}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=False)  # a 3-channel first conv is adapted after, from these kernels


def torchvision_model(arch: str, in_channels: int, num_classes: int, input_size: int, weights=None) -> nn.Module:
    """Any torchvision classification model by name (torchvision.models.get_model), its first conv
    rebuilt for `in_channels` and its classifier for `num_classes`. Random weights unless `weights`
    is a torchvision weights name (IMAGENET1K_V1, DEFAULT) whose file is already in the torch hub
    cache, or a state_dict file; nothing is downloaded."""
    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise ConfigError("model.arch", arch, f"not a torchvision classification model; e.g. "
                                              f"{_suggest(arch, names, EXAMPLES)}")
    source = _torchvision_weights(arch, weights)
    _check_size(arch, input_size, weights, source)
    options = {"aux_logits": False} if arch in AUX_LOGITS else {}
    if source is None:
        options.update({kw: (input_size if kw == "image_size" else (input_size, input_size))
                        for prefix, kw in SIZE_KWARG.items() if arch.startswith(prefix)})

    def construct(load: bool) -> nn.Module:
        # GoogLeNet/Inception warn unless told how to initialise random weights: as they do by default
        init = {"init_weights": True} if arch in AUX_LOGITS else {}
        if isinstance(source, WeightsEnum):
            model = (get_model(arch, weights=source, **options) if load else
                     get_model(arch, weights=None, num_classes=len(source.meta["categories"]), **options, **init))
        else:
            model = get_model(arch, weights=None, num_classes=num_classes, **options, **init)
            if load and source is not None:
                _load_state_dict_file(model, source, in_channels, arch)
        adapt_classifier(model, num_classes, arch)
        adapt_first_conv(model, in_channels, arch, pretrained=load and source is not None)
        if getattr(model, "transform_input", False) and in_channels != 3:
            model.transform_input = False  # it converts three ImageNet-normalised channels by index
        return model

    return build_checked(construct, in_channels, num_classes, input_size, arch, (TORCHVISION, arch, weights))


def timm_model(arch: str, in_channels: int, num_classes: int, input_size: int, weights=None) -> nn.Module:
    """Any timm model by name (timm.create_model, which adapts its own input conv and classifier).
    Random weights unless `weights` is a checkpoint file here (timm's pretrained_cfg_overlay file=);
    nothing is downloaded."""
    try:
        import timm  # an optional extra: imported only for a timm model
    except ImportError:  # absent, or an install that does not import
        raise ConfigError("model", "timm", install_hint(TIMM)) from None
    if not timm.is_model(arch):
        close = _suggest(arch, timm.list_models())
        raise ConfigError("model.arch", arch, f"not a timm model; close matches: {close}" if close else
                                              "not a timm model (timm.list_models() names them all)")
    file = None
    if weights is not None:
        file = os.path.abspath(os.path.expanduser(str(weights)))
        if not os.path.isfile(file):
            raise ConfigError("model.weights", weights, f"no such file: {file} (timm models load weights from a "
                                                        "checkpoint file here; nothing is downloaded)")

    def construct(load: bool) -> nn.Module:
        pretrained = load and file is not None
        return timm.create_model(arch, pretrained=pretrained, in_chans=in_channels, num_classes=num_classes,
                                 **({"pretrained_cfg_overlay": {"file": file}} if pretrained else {}))

    return build_checked(construct, in_channels, num_classes, input_size, arch, (TIMM, arch, weights))


def make(m: dict, channels: int, num_classes: int) -> nn.Module:
    """The model of the resolved model config `m` (any `_target_`) for `channels`-channel images and
    `num_classes` classes; ConfigError in one line where it cannot be built or adapted.

    A foreign `_target_` (a user's model YAML) gets its own keys, less coupled_net's reserved ones it
    does not take (input_size always; in_channels, num_classes, name unless its signature names them:
    then in_channels/num_classes are the dataset's), and is then adapted like torchvision_model: first
    conv rebuilt for the channels (from its kernels when the config sets `weights` or `pretrained`),
    classifier for the classes where its output does not already have one logit per class
    (coupled_net.adapt.fit_classifier: a model that takes num_classes keeps its own head)."""
    num_classes = 2 if num_classes is None else num_classes  # image_folder before its classes are counted
    target = m.get("_target_")
    options = {k: v for k, v in m.items() if k != "_target_"}
    if target == BUILTIN:
        return build_model(**{**options, "in_channels": channels, "num_classes": num_classes})
    own = {TORCHVISION: torchvision_model, TIMM: timm_model}.get(target)
    if own is not None:
        named, var_kw = keywords(own)
        options = {k: v for k, v in options.items() if k != "name"}
        check_keys("model", target, options, named, var_kw)
        return own(**{**options, "in_channels": channels, "num_classes": num_classes})
    name = model_name(m)
    fn = locate(str(target), "model._target_")
    if not callable(fn):
        raise ConfigError("model._target_", target, f"is a {type(fn).__name__}, not a class or function")
    named, var_kw = keywords(fn)
    given = {"in_channels": channels, "num_classes": num_classes, **({"name": m["name"]} if "name" in m else {})}
    options = {k: v for k, v in options.items() if k not in RESERVED}
    check_keys("model", target, options, named, var_kw)
    options.update({k: v for k, v in given.items() if k in named})
    pretrained = any(options.get(k) not in (None, False) for k in ("weights", "pretrained"))
    size = m.get("input_size")
    fitted: dict = {}  # whether its classifier fits as built: found on the first build (the meta one), kept

    def construct(load: bool) -> nn.Module:
        try:
            model = instantiate({"_target_": target, **options}, _convert_="all")
        except Exception as e:  # hydra's InstantiationException wraps the model's own error
            raise (e.__cause__ or e) from None
        if not isinstance(model, nn.Module):
            raise ConfigError("model._target_", target, f"returned a {type(model).__name__}, not a torch.nn.Module")
        fitted["head"] = fit_classifier(model, num_classes, name, channels, size, given="num_classes" in options,
                                        fits=fitted.get("head"))
        adapt_first_conv(model, channels, name, pretrained=pretrained)
        return model

    return build_checked(construct, channels, num_classes, size, name, (target, options))
