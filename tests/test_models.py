"""Models beyond the built-in four: any torchvision classification model (model=torchvision), any timm
model (model=timm) and a user's own model YAML (`_target_` from --config-dir) are adapted to the
dataset's channels and classes, coupled at their first conv and trained; what cannot be built is
refused in one exact line; the seed's AlexNet is unchanged."""

from __future__ import annotations

import sys

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from torch import nn

from coupled_net import models
from coupled_net.build import build, make_trainer, resolve
from coupled_net.coupling import Coupling
from coupled_net.errors import ConfigError
from coupled_net.identity import model_name
from coupled_net.trainer import LoopState
from helpers import CONF, REPO, compose_cfg, run_cli

# trainer.threads=1: two threads on a loaded 2-core machine run ten times slower
SMALL_RUN = ["model.input_size=32", "trainer.batch_size=4", "trainer.threads=1", "trainer.limit_batches=2",
             "trainer.epochs=1", "trainer.device=cpu", "trainer.num_workers=0", "trainer.checkpoint_every=null",
             "coupling.alpha=2"]
# 1 channel: the offline synthetic letters (26 classes); 3 channels: the in-memory CIFAR-10 stand-in (10)
DATA = {1: ["dataset=synthetic_letters", "dataset.train_per_class=4", "dataset.test_per_class=2"],
        3: ["dataset=cifar10"]}
CLASSES = {1: 26, 3: 10}


def tv(arch, channels=1, num_classes=26, input_size=32, weights=None) -> dict:
    """A resolved model=torchvision config."""
    return {"_target_": "coupled_net.models.torchvision_model", "arch": arch, "weights": weights,
            "in_channels": channels, "num_classes": num_classes, "input_size": input_size}


def refusal(m: dict, channels=1, num_classes=26) -> str:
    with pytest.raises(ConfigError) as err:
        models.make(m, channels, num_classes)
    return str(err.value)


def pairs_equal(conv: nn.Conv2d, n: int) -> list[bool]:
    return [torch.equal(conv.weight[2 * k], conv.weight[2 * k + 1]) for k in range(n)]


def train_two_batches(cfg):
    """resolve, build and fit one epoch of two batches; returns the built parts."""
    spec = resolve(cfg)
    parts = build(spec)
    head = [p for p in parts.model.parameters()][-1].detach().clone()
    make_trainer(spec, parts).fit(LoopState())
    assert not torch.equal([p for p in parts.model.parameters()][-1], head)  # it trained
    return parts


def assert_coupled_first_conv(parts, path: str, channels: int, num_classes: int) -> None:
    assert parts.coupling.layer_paths == [path]
    conv = parts.model.get_submodule(path)
    assert conv.in_channels == channels
    parts.coupling.equalize()
    assert pairs_equal(conv, 3) == [True, True, False]  # alpha=2: filters 0=1, 2=3; 4 and 5 untouched
    parts.model.eval()
    with torch.no_grad():
        out = parts.model(torch.zeros(2, channels, 32, 32))
    assert out.shape == (2, num_classes)


@pytest.mark.parametrize("arch, first_conv, channels", [
    ("mobilenet_v3_small", "features.0.0", 1),
    ("mobilenet_v3_small", "features.0.0", 3),
    ("efficientnet_b0", "features.0.0", 1),
    ("efficientnet_b0", "features.0.0", 3),
    ("regnet_y_400mf", "stem.0", 1),
    ("regnet_y_400mf", "stem.0", 3),
])
def test_a_torchvision_model_is_coupled_at_its_first_conv_and_trains(arch, first_conv, channels, tmp_path,
                                                                      standin_datasets):
    cfg = compose_cfg("model=torchvision", f"model.arch={arch}", *DATA[channels], *SMALL_RUN,
                      f"dataset.root={tmp_path}")
    parts = train_two_batches(cfg)
    assert_coupled_first_conv(parts, first_conv, channels, CLASSES[channels])


@pytest.mark.parametrize("channels", [1, 3])
def test_a_timm_model_is_coupled_at_its_first_conv_and_trains(channels, tmp_path, standin_datasets):
    cfg = compose_cfg("model=timm", "model.arch=resnet10t", *DATA[channels], *SMALL_RUN, f"dataset.root={tmp_path}")
    parts = train_two_batches(cfg)
    assert_coupled_first_conv(parts, "conv1.0", channels, CLASSES[channels])


USER_MODEL = """\
_target_: torchvision.models.mobilenet_v3_small
name: my_mobilenet
in_channels: ${dataset.channels}
num_classes: ${dataset.num_classes}
input_size: 32
dropout: 0.1
"""


@pytest.mark.parametrize("channels", [1, 3])
def test_a_users_own_model_yaml_is_adapted_coupled_and_trained(channels, tmp_path, standin_datasets):
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "my_mobilenet.yaml").write_text(USER_MODEL)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=[f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "model=my_mobilenet",
                                          *DATA[channels], *SMALL_RUN, f"dataset.root={tmp_path}"])
    assert model_name(dict(cfg.model)) == "my_mobilenet"
    parts = train_two_batches(cfg)
    # mobilenet_v3_small takes neither in_channels nor num_classes: its first conv and classifier were rebuilt
    assert parts.model.classifier[3].out_features == CLASSES[channels]
    assert parts.model.classifier[2].p == 0.1  # its own key reached it
    assert_coupled_first_conv(parts, "features.0.0", channels, CLASSES[channels])


def test_a_foreign_target_that_takes_num_classes_gets_the_datasets_and_keeps_its_own_keys():
    model = models.make({"_target_": "torchvision.models.AlexNet", "input_size": 64, "num_classes": 26,
                         "in_channels": 1, "dropout": 0.25}, 1, 26)
    assert model.classifier[6].out_features == 26
    assert model.classifier[0].p == 0.25
    conv = model.features[0]  # AlexNet takes no in_channels: rebuilt like torchvision's, for 1 channel
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (1, 64, (11, 11),
                                                                                                  (4, 4), (2, 2))


# ---- refusals, each in one exact line -----------------------------------------------------------------

def test_an_unknown_torchvision_arch_is_refused_with_examples_or_close_names():
    assert refusal(tv("foo")) == ("model.arch='foo': not a torchvision classification model; e.g. mobilenet_v3_small, "
                                  "efficientnet_b0, resnet18, densenet121, regnet_y_400mf, convnext_tiny")
    assert refusal(tv("resnet1")) == ("model.arch='resnet1': not a torchvision classification model; e.g. resnet18, "
                                      "resnet152, resnet101, resnet50, resnet34")
    # a detection model is a torchvision model, but not a classifier
    assert refusal(tv("fasterrcnn_resnet50_fpn")).startswith(
        "model.arch='fasterrcnn_resnet50_fpn': not a torchvision classification model; e.g. ")


def test_torchvision_weights_not_in_the_hub_cache_are_refused_without_a_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    cached = tmp_path / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    url = "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth"
    expected = (f"{cached} is not in the torch hub cache; nothing is downloaded here: copy {url} there, "
                "or give a state_dict file")
    assert refusal(tv("mobilenet_v3_small", weights="IMAGENET1K_V1")) == f"model.weights='IMAGENET1K_V1': {expected}"
    assert refusal(tv("mobilenet_v3_small", weights="DEFAULT")) == f"model.weights='DEFAULT': {expected}"
    assert refusal(tv("mobilenet_v3_small", weights="V2")) == (
        "model.weights='V2': not a weights name of torchvision mobilenet_v3_small (IMAGENET1K_V1, DEFAULT) "
        "nor a state_dict file")
    missing = tmp_path / "no" / "weights.pth"
    assert refusal(tv("mobilenet_v3_small", weights=str(missing))) == (
        f"model.weights='{missing}': no such file: {missing}")


def test_cached_torchvision_weights_load_and_the_rgb_kernels_are_summed_for_one_channel(tmp_path, monkeypatch):
    import torchvision.models._api as tv_api

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    original = tv_api.load_state_dict_from_url
    # the file here is a stand-in, not the published one: its hash cannot match the one in its name
    monkeypatch.setattr(tv_api, "load_state_dict_from_url",
                        lambda url, *a, **k: original(url, *a, **{**k, "check_hash": False}))
    torch.manual_seed(3)
    saved = torchvision.models.mobilenet_v3_small().state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(saved, tmp_path / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth")

    gray = models.make(tv("mobilenet_v3_small", weights="DEFAULT"), 1, 26)
    rgb = saved["features.0.0.weight"]
    expected = rgb[:, 0:1] + rgb[:, 1:2] + rgb[:, 2:3]
    torch.testing.assert_close(gray.features[0][0].weight, expected)
    assert torch.equal(gray.features[1].block[0][0].weight, saved["features.1.block.0.0.weight"])
    assert gray.classifier[3].out_features == 26  # a new classifier for this dataset's classes
    assert torch.equal(gray.classifier[0].weight, saved["classifier.0.weight"])

    color = models.make(tv("mobilenet_v3_small", channels=3, weights="IMAGENET1K_V1"), 3, 10)
    assert torch.equal(color.features[0][0].weight, rgb)


def test_a_state_dict_file_loads_with_a_new_classifier_and_an_adapted_first_conv(tmp_path):
    torch.manual_seed(4)
    saved = torchvision.models.regnet_y_400mf().state_dict()  # 1000 classes, 3 channels
    torch.save({"state_dict": saved}, tmp_path / "regnet.pt")
    model = models.make(tv("regnet_y_400mf", channels=1, weights=str(tmp_path / "regnet.pt")), 1, 26)
    torch.testing.assert_close(model.stem[0].weight, saved["stem.0.weight"].sum(1, keepdim=True))
    assert torch.equal(model.trunk_output[0][0].proj[0].weight, saved["trunk_output.block1.block1-0.proj.0.weight"])
    assert model.fc.out_features == 26
    # a file saved from this project's adapted model (1 channel, 26 classes) loads as it is
    torch.save(model.state_dict(), tmp_path / "mine.pt")
    again = models.make(tv("regnet_y_400mf", channels=1, weights=str(tmp_path / "mine.pt")), 1, 26)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), tmp_path / "other.pt")
    assert refusal(tv("regnet_y_400mf", weights=str(tmp_path / "other.pt"))) == (
        f"model.weights='{tmp_path / 'other.pt'}': does not fit torchvision regnet_y_400mf: missing: stem.0.weight, "
        "stem.1.weight, stem.1.bias …; unexpected: features.0.0.weight, features.0.1.weight, features.0.1.bias …")


def test_an_unknown_timm_arch_or_a_missing_weights_file_or_timm_itself_is_refused(tmp_path, monkeypatch):
    timm_cfg = {"_target_": "coupled_net.models.timm_model", "arch": "resnet10", "weights": None, "in_channels": 1,
                "num_classes": 26, "input_size": 32}
    assert refusal(timm_cfg) == ("model.arch='resnet10': not a timm model; close matches: resnet10t, resnet101, "
                                 "resnet101s, resnet101d, resnet101c")
    assert refusal({**timm_cfg, "arch": "zzzzqqq"}) == (
        "model.arch='zzzzqqq': not a timm model (timm.list_models() names them all)")
    missing = tmp_path / "resnet10t.safetensors"
    assert refusal({**timm_cfg, "arch": "resnet10t", "weights": str(missing)}) == (
        f"model.weights='{missing}': no such file: {missing} (timm models load weights from a checkpoint file here; "
        "nothing is downloaded)")
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    assert refusal({**timm_cfg, "arch": "resnet10t"}) == (
        "model='timm': needs the timm package: pip install -e '.[timm]'")


def test_a_timm_weights_file_is_loaded_with_the_classifier_and_input_conv_adapted(tmp_path):
    import timm

    torch.manual_seed(5)
    saved = timm.create_model("resnet10t").state_dict()  # 3 channels, 1000 classes
    torch.save(saved, tmp_path / "resnet10t.pth")
    model = models.make({"_target_": "coupled_net.models.timm_model", "arch": "resnet10t",
                         "weights": str(tmp_path / "resnet10t.pth"), "in_channels": 1, "num_classes": 26,
                         "input_size": 32}, 1, 26)
    torch.testing.assert_close(model.conv1[0].weight, saved["conv1.0.weight"].sum(1, keepdim=True))
    assert torch.equal(model.layer1[0].conv1.weight, saved["layer1.0.conv1.weight"])
    assert model.fc.out_features == 26


class GroupedStem(nn.Module):
    """A model whose input conv is grouped over the three colour channels: no 1-channel version of it."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, groups=3)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x):
        return self.fc(self.stem(x).mean((2, 3)))


class ConvHead(nn.Module):
    """A model whose last layer is a 3x3 conv: no classifier to replace."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(1, 8, 3)
        self.head = nn.Conv2d(8, 10, 3)

    def forward(self, x):
        return self.head(self.body(x)).mean((2, 3))


def test_a_model_that_cannot_be_adapted_is_refused_in_one_line():
    assert refusal({"_target_": f"{__name__}.GroupedStem", "input_size": 32}) == (
        "model='GroupedStem': cannot adapt its first conv stem to 1 input channel(s): it is grouped (groups=3)")
    assert refusal({"_target_": f"{__name__}.ConvHead", "name": "conv_head", "input_size": 32}) == (
        "model='conv_head': cannot adapt its classifier to 26 classes: its last layer head is a 3x3 Conv2d, not a "
        "Linear or 1x1 Conv2d")
    # 3 channels and 10 classes need no adaptation: the same model is fine
    assert isinstance(models.make({"_target_": f"{__name__}.GroupedStem", "input_size": 32}, 3, 10), GroupedStem)


# ---- adapting only what needs it (issue 18, item 11) ------------------------------------------------------

OWN = "helpers.ownmodels"


def test_a_model_that_takes_num_classes_keeps_its_classifier_though_a_1x1_conv_is_registered_after_it():
    model = models.make({"_target_": f"{OWN}.HeadBeforeMix", "input_size": 28}, 1, 26)
    assert (model.fc.out_features, model.mix.in_channels, model.mix.out_channels) == (26, 8, 8)  # mix untouched
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 26)
    with torch.device("meta"):  # validation's build decides alike
        assert models.make({"_target_": f"{OWN}.HeadBeforeMix", "input_size": 28}, 1, 26).mix.out_channels == 8


def test_a_classifier_whose_rebuilding_breaks_the_forward_is_refused_for_that_not_for_the_input_size():
    # no num_classes parameter and 10 outputs: the last Linear or Conv2d (mix) is rebuilt, which breaks it
    assert refusal({"_target_": f"{OWN}.FixedHeadBeforeMix", "input_size": 28}) == (
        "model='FixedHeadBeforeMix': returns shape (1, 10) for one image, not (1, 26), and rebuilding mix (its last "
        "Linear or 1x1 Conv2d) for 26 classes breaks its forward (RuntimeError: a and b must have same reduction dim, "
        "but got [1, 26] X [8, 10].); give it a num_classes parameter that sizes its own classifier")
    fits = models.make({"_target_": f"{OWN}.FixedHeadBeforeMix", "input_size": 28}, 1, 10)  # 10 classes: as it is
    assert (fits.fc.out_features, fits.mix.out_channels) == (10, 8)


MLP_RUN = ["experiment=quickstart", f"model._target_={OWN}.MLP", "model.name=mlp", "~model.width",
           "dataset.train_per_class=4", "dataset.test_per_class=1", "trainer.batch_size=16", "trainer.epochs=1",
           "trainer.limit_batches=2", "trainer.num_workers=0", "trainer.device=cpu", "trainer.threads=1"]


def test_a_model_without_a_conv_trains_uncoupled_at_alpha_0(tmp_path):
    from coupled_net.lifecycle import execute_run

    res = execute_run(compose_cfg(*MLP_RUN, "coupling.alpha=0", f"dataset.root={tmp_path}"), tmp_path / "run")
    assert (res["status"], res["coupled_layers"]) == ("done", [])


def test_a_model_without_a_conv_is_refused_for_alpha_above_0_in_one_line_before_any_directory(tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve(compose_cfg(*MLP_RUN, "coupling.alpha=1"))
    message = "coupling.alpha=1: needs a Conv2d layer to couple and the model has none; coupling.alpha=0 trains it " \
              "uncoupled"
    assert str(err.value) == message
    proc = run_cli(*MLP_RUN, "coupling.alpha=1", f"hydra.run.dir={tmp_path / 'out'}", f"dataset.root={tmp_path}",
                   cwd=tmp_path, env={"PYTHONPATH": str(REPO / "tests")})
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [f"coupled_net: error: {message}"])
    assert list(tmp_path.iterdir()) == []


def test_a_foreign_targets_unknown_key_or_import_or_build_failure_is_one_line():
    assert refusal({"_target_": "torchvision.models.AlexNet", "input_size": 64, "depth": 3}) == (
        "model.depth=3: not a key of model torchvision.models.AlexNet (its keys: num_classes, dropout)")
    assert refusal({"_target_": "coupled_net.models.torchvision_model", "arch": "resnet18", "input_size": 32,
                    "width": 8}) == ("model.width=8: not a key of model coupled_net.models.torchvision_model "
                                     "(its keys: arch, in_channels, num_classes, input_size, weights)")
    assert refusal({"_target_": "no_such_package.Net", "input_size": 32}) == (
        "model._target_='no_such_package.Net': cannot be imported: no module named no_such_package")
    assert refusal({"_target_": "torchvision.models.resnet.ResNet", "input_size": 32, "block": None}) == (
        "model='ResNet': TypeError: ResNet.__init__() missing 1 required positional argument: 'layers'")


def test_the_smallest_input_size_is_found_up_front():
    # inception_v3 (no aux head): unpadded 3x3 convs and 3x3/2 pools, floor((n-3)/2)+1 at stride 2.
    # Mixed_7a's 3x3/2 conv needs a 3-pixel map, so Mixed_6a's input needs 7, the 2nd pool's input 15,
    # Conv2d_4a's input 17, the 1st pool's input 35, Conv2d_2a's input 37, and the stem's 2*36+3 = 75
    assert refusal(tv("inception_v3", input_size=74)) == (
        "model.input_size=74: inception_v3 needs images of at least 75 pixels")
    with torch.device("meta"):
        assert models.make(tv("inception_v3", input_size=75), 1, 26).fc.out_features == 26
    # a model built for one size says so instead of naming a smallest size (torchvision's ViT: 224)
    assert refusal({"_target_": "torchvision.models.vit_b_16", "input_size": 32}) == (
        "model.input_size=32: vit_b_16 does not run on images of 32 pixels: AssertionError: Wrong image height! "
        "Expected 224 but got 32!")
    # model=torchvision builds a ViT for model.input_size; one its patches do not divide is refused naming
    # model.input_size and the multiple it needs, and pretrained weights fix the size
    with torch.device("meta"):
        assert models.make(tv("vit_b_16", input_size=48), 1, 26).image_size == 48
    assert refusal(tv("vit_b_16", input_size=40)) == (
        "model.input_size=40: vit_b_16 needs a multiple of 16 pixels (its patch size), e.g. 32 or 48")
    assert refusal(tv("vit_h_14", input_size=13)) == (
        "model.input_size=13: vit_h_14 needs a multiple of 14 pixels (its patch size), e.g. 14")
    assert refusal(tv("maxvit_t", input_size=32)) == (
        "model.input_size=32: maxvit_t needs a multiple of 224 pixels (7x7 attention windows at 1/32 of the image), "
        "e.g. 224")


def test_a_vit_with_a_weights_file_needs_the_size_its_weights_fix(tmp_path):
    (tmp_path / "vit.pth").write_bytes(b"")  # refused before it is read
    assert refusal(tv("vit_b_16", input_size=32, weights=str(tmp_path / "vit.pth"))) == (
        f"model.input_size=32: vit_b_16 with model.weights={tmp_path / 'vit.pth'} needs images of exactly 224 pixels, "
        "the size its weights fix")


def test_validation_builds_the_model_on_the_meta_device_and_refuses_before_any_data(monkeypatch):
    from coupled_net import data

    monkeypatch.setattr(data, "build_splits", lambda *a, **k: pytest.fail("data was built"))
    with pytest.raises(ConfigError, match=r"^model.input_size=74: inception_v3 needs images of at least 75 pixels$"):
        resolve(compose_cfg("model=torchvision", "model.arch=inception_v3", "model.input_size=74"))
    with pytest.raises(ConfigError, match=r"^model.arch='foo': not a torchvision classification model; e.g. "):
        resolve(compose_cfg("model=torchvision", "model.arch=foo"))


def test_the_seeds_alexnet_is_unchanged():
    for channels in (1, 3):
        model = models.make(dict(compose_cfg(f"dataset.channels={channels}").model) | {"in_channels": channels},
                            channels, 26)
        conv = model.features[0]
        assert (type(conv), conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (
            nn.Conv2d, channels, 64, (11, 11), (4, 4), (2, 2))
        reference = torchvision.models.alexnet(num_classes=26)
        # torchvision's AlexNet with a C-channel first conv: 64*3*11*11 weights become 64*C*11*11
        expected = sum(p.numel() for p in reference.parameters()) - 64 * 3 * 121 + 64 * channels * 121
        assert sum(p.numel() for p in model.parameters()) == expected
        assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]


# ---- coupling a grouped conv ---------------------------------------------------------------------------

def test_coupling_a_depthwise_conv_is_refused_with_its_reason():
    with torch.device("meta"):
        model = models.make(tv("mobilenet_v3_small"), 1, 26)
    assert model.features[1].block[0][0].groups == 16  # 16 filters, one per group
    with pytest.raises(ConfigError) as err:
        Coupling(model, alpha=2, layer="features.1.block.0.0")
    assert str(err.value) == (
        "coupling.layer='features.1.block.0.0': a grouped conv (groups=16, 1 filter(s) per group): filters 2k and 2k+1 "
        "see different input channels, so equal filters would not give equal outputs; couple a conv with an even "
        "number of filters per group")
    assert Coupling(model, alpha=0, layer="features.1.block.0.0").alpha == 0  # nothing coupled: allowed


def test_coupling_a_grouped_conv_with_pairs_inside_groups_makes_their_outputs_equal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))  # 4 filters per group: pairs (0,1) (2,3) | (4,5) (6,7)
    coupling = Coupling(model, alpha=3)
    coupling.equalize()
    assert pairs_equal(model[0], 4) == [True, True, True, False]
    with torch.no_grad():
        out = model(torch.randn(1, 4, 5, 5))
    assert torch.equal(out[0, 4], out[0, 5])  # pair 2 straddles no group: the same inputs, the same map
    assert not torch.equal(out[0, 6], out[0, 7])


def test_the_model_summary_leaves_the_model_on_its_own_device(tmp_path):
    # the meta device stands in for a GPU: torchinfo moves a model to the device it is given, and a
    # summary on "cpu" once left every GPU run's model on the CPU
    from coupled_net.coupling import Coupling
    from coupled_net.lifecycle import write_model_summary

    with torch.device("meta"):
        model = models.make({"_target_": "coupled_net.models.torchvision_model", "arch": "mobilenet_v3_small",
                             "weights": None, "input_size": 32}, 1, 26)
    write_model_summary(model, 1, 32, Coupling(model, 2), tmp_path / "model_summary.txt")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert "coupled layer(s): features.0.0; alpha=2" in (tmp_path / "model_summary.txt").read_text()


# ---- pretrained kernels for another number of input channels ------------------------------------

@pytest.mark.parametrize("channels", [1, 6])
def test_pretrained_rgb_kernels_adapted_to_other_channels_keep_the_response_to_a_grey_image(channels):
    import copy

    from coupled_net.adapt import adapt_first_conv

    torch.manual_seed(3)
    rgb = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    adapted = copy.deepcopy(rgb)
    adapt_first_conv(adapted, channels, "rgb_net", pretrained=True)
    assert adapted[0].in_channels == channels and adapted[0].weight.shape == (8, channels, 3, 3)
    grey = torch.rand(2, 1, 9, 9)
    with torch.no_grad():
        want = rgb(grey.expand(2, 3, 9, 9))  # a grey image is three equal colour channels
        got = adapted(grey.expand(2, channels, 9, 9))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.abs().mean() > 0.1  # a response worth comparing
    if channels == 1:  # the sum of the three kernels, by hand
        w = rgb[0].weight
        torch.testing.assert_close(adapted[0].weight[:, 0], w[:, 0] + w[:, 1] + w[:, 2])
