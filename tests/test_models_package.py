"""The model package: one-way imports, every registered part builds, old files load, multi-level trunks."""

from __future__ import annotations

import ast
import copy
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import imret
from imret.models import (
    GlobalHead,
    Head,
    ModelSpec,
    create_backbone,
    create_head,
    create_model,
    feature_maps,
    head_levels,
    list_backbones,
    list_heads,
    list_pools,
    load_model,
    load_weights,
    save_model,
)
from imret.models import heads as heads_module
from imret.models.backbones import create_trunk, trunk_channels
from imret.models.pooling import gem

SRC = Path(__file__).resolve().parents[1] / "src"
FIXTURES = Path(__file__).resolve().parent / "data" / "models"


# --- imports point one way ------------------------------------------------------------------


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _top_level_imports(tree: ast.Module):
    """Import statements that run when the module is imported: everywhere except inside
    function bodies (a lazy import in a function runs on call, after every module finished)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """``module -> modules of package it imports at import time``, from the source under ``root``.

    Relative imports are resolved; ``from pkg import name`` depends on ``pkg.name`` when that
    is a module, else on ``pkg``; ``import a.b.c`` depends on ``a.b.c``. Imports inside
    functions (lazy imports) are not edges: they cannot make importing fail half-way.
    """
    files = {_module_name(p, root): p for p in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        pkg_parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in _top_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base_parts = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            graph[mod].update(t for t in targets if t in files and t != mod)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle_in_imret():
    """Module-level imports of src/imret form no cycle (lazy imports inside functions do not count)."""
    graph = import_graph(SRC, "imret")
    assert "imret.models.net" in graph and graph["imret.models.net"]  # the graph is not empty
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_model_package_layers():
    """spec <- backbones, pooling <- heads <- dolg <- net <- checkpoints <- factory <- __init__, and
    only base modules of imret from outside the package."""
    rank = {"spec": 0, "hub": 0, "pooling": 1, "backbones": 1, "heads": 2, "dolg": 3, "net": 4, "checkpoints": 5,
            "factory": 6}
    graph = import_graph(SRC, "imret")
    models = {m: deps for m, deps in graph.items() if m.startswith("imret.models")}
    assert set(models) == {"imret.models"} | {f"imret.models.{n}" for n in rank}
    for mod, deps in models.items():
        for dep in deps:
            if dep.startswith("imret.models."):
                if mod == "imret.models":
                    continue
                a, b = mod.rsplit(".", 1)[1], dep.rsplit(".", 1)[1]
                assert rank[b] < rank[a], f"{mod} imports {dep}, which stands after it"
            else:
                assert dep in ("imret.fileio", "imret._checks"), f"{mod} imports {dep} from outside the model layer"
    assert models["imret.models.spec"] == set()


def test_cycle_finder_finds_a_cycle_and_ignores_lazy_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .c import C\n")
    (pkg / "a.py").write_text("from .b import B\n\nclass A:\n    def f(self):\n        from . import c\n")
    (pkg / "b.py").write_text("import pkg.sub.c\nB = 1\n")
    (pkg / "sub" / "c.py").write_text("C = 1\n\ndef g():\n    from .. import a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == set()
    assert find_cycle(graph) is None
    (pkg / "sub" / "c.py").write_text("from ..a import A\n")  # now a -> b -> c -> a at import time
    cycle = find_cycle(import_graph(tmp_path, "pkg"))
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"pkg.a", "pkg.b", "pkg.sub.c"}


def test_old_import_paths_are_the_new_objects():
    from imret import backbones, model, pooling, weights
    from imret.models import backbones as new_backbones
    from imret.models import checkpoints, factory, net, spec
    from imret.models import pooling as new_pooling

    assert model.create_model is factory.create_model and model.RetrievalNet is net.RetrievalNet
    assert model.ModelSpec is spec.ModelSpec and imret.ModelSpec is spec.ModelSpec
    assert weights.load_model is factory.load_model and weights.save_model is checkpoints.save_model
    assert weights.convert_cirtorch is checkpoints.convert_cirtorch
    assert backbones.create_trunk is new_backbones.create_trunk and pooling.GeM is new_pooling.GeM
    for old in (model, weights, backbones, pooling):
        assert all(hasattr(old, n) for n in old.__all__)


# --- every registered part builds ------------------------------------------------------------


def _check_descriptors(y: torch.Tensor, batch: int, dim: int) -> None:
    assert y.shape == (batch, dim) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.norm(dim=1), torch.ones(batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_preset_builds(name):
    torch.manual_seed(0)
    net = create_model(name, "gem", pretrained=False)
    with torch.inference_mode():
        y = net(torch.randn(2, 3, 64, 72))
    assert net.dim == trunk_channels(net.trunk) == net.feature_levels.channels[-1]
    _check_descriptors(y, 2, net.dim)


@pytest.mark.parametrize("pool", list_pools())
@pytest.mark.parametrize("whitening", [None, 24])
def test_every_pooling_builds(pool, whitening):
    torch.manual_seed(0)
    net = create_model("test_resnet", pool, whitening=whitening, pretrained=False)
    with torch.inference_mode():
        y = net(torch.randn(3, 3, 67, 83))
    _check_descriptors(y, 3, whitening or 96)
    assert net.dim == (whitening or 96) and net.pool is net.head.pool


@pytest.mark.parametrize("name", list_heads())
def test_every_head_builds(name):
    torch.manual_seed(0)
    net = create_model("test_efficientnet", head=name, pretrained=False)
    assert isinstance(net.head, Head) and net.spec.head == name
    assert len(net.feature_levels.channels) == len(head_levels(name))
    with torch.inference_mode():
        y = net(torch.randn(2, 3, 67, 83))
    _check_descriptors(y, 2, net.dim)
    head = create_head(name, net.feature_levels.channels)
    assert isinstance(head, Head) and head.dim >= 1


def test_registries_name_the_choices():
    assert "global" in list_heads() and list_heads("glob*") == ["global"]
    with pytest.raises(ValueError, match=r"unknown head 'dolgg'; available: dolg, global"):
        create_model("test_resnet", head="dolgg")
    with pytest.raises(ValueError, match="unknown head"):
        head_levels("nope")
    with pytest.raises(ValueError, match=r"bad arguments \{'size': 3\} for head 'global'"):
        create_head("global", [8], size=3)


def test_global_head_is_pool_l2_whiten_l2():
    """The head computes normalise(W normalise(gem(x)) + b), on the last map of a list or on a bare map."""
    torch.manual_seed(0)
    head = GlobalHead([4, 6], pool="gem", pool_kwargs={"p": 2.5, "learn_p": False}, whitening=3)
    with torch.no_grad():
        head.whiten.weight.normal_()
        head.whiten.bias.normal_()
    maps = [torch.rand(2, 4, 6, 6), torch.rand(2, 6, 3, 5)]
    ref = F.normalize(head.whiten(F.normalize(gem(maps[1], 2.5), dim=1)), dim=1)
    torch.testing.assert_close(head(maps), ref)
    torch.testing.assert_close(head(maps[1]), ref)
    assert head.levels == (-1,) and head.dim == 3 and head.multiscale_power() == 1.0
    head.whiten = None
    assert head.dim == 6 and head.multiscale_power() == pytest.approx(2.5)


def test_net_keeps_the_first_layout_attributes():
    torch.manual_seed(0)
    net = create_model("test_resnet", "gem", pretrained=False)
    assert net.whiten is None and net.pool is net.head.pool
    assert {k.split(".")[0] for k in net.state_dict()} == {"trunk", "head"}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.head(net.features(x)), net(x))
    layer = torch.nn.Linear(96, 8)
    net.whiten = layer  # assigning the net's whiten assigns the head's
    assert net.head.whiten is layer and net.whiten is layer and net.dim == 8
    net.set_whitening(torch.eye(4, 96))
    assert net.dim == 4 and net.spec.whitening == 4 and net.head.whiten.out_features == 4


# --- files saved before the model package still load ------------------------------------------

_FIXTURES = {  # file -> what it holds: create_model arguments and descriptor dimension
    "test_resnet_gem.safetensors": (dict(backbone="test_resnet", pool="gem"), 96),
    "test_efficientnet_gem_whiten.pt": (
        dict(backbone="test_efficientnet", pool="gem", whitening=32, pool_kwargs={"p": 3.0, "learn_p": False}), 32),
    "test_efficientnet_rmac_whiten.safetensors": (
        dict(backbone="test_efficientnet", pool="rmac", whitening=16, l2_before_whiten=False), 16),
}


@pytest.fixture(scope="module")
def fixture_input() -> torch.Tensor:
    return torch.from_numpy(np.load(FIXTURES / "input.npy"))


def _expected(name: str) -> np.ndarray:
    return np.load(FIXTURES / (name.split(".")[0] + ".npy"))


def _descriptors(net, x) -> np.ndarray:
    with torch.inference_mode():
        return net(x).numpy()


@pytest.mark.parametrize("name", sorted(_FIXTURES))
def test_old_checkpoint_loads_with_the_same_descriptors(name, fixture_input, tmp_path):
    """Checkpoints written by imret before the model package (commit 601bd50, see
    tests/data/make_model_fixtures.py) rebuild the same model, and saving it again writes
    the same content (safetensors: the same bytes)."""
    kwargs, dim = _FIXTURES[name]
    path = FIXTURES / name
    net = load_model(path)
    spec = net.spec
    assert (spec.backbone, spec.pool, spec.whitening, net.dim) == (kwargs["backbone"], kwargs["pool"], kwargs.get("whitening"), dim)
    assert spec.l2_before_whiten == kwargs.get("l2_before_whiten", True) and spec.pool_kwargs == kwargs.get("pool_kwargs", {})
    assert spec.head == "global" and spec.head_kwargs == {}
    assert net.weights_sha256 == imret.models.file_sha256(path)
    np.testing.assert_allclose(_descriptors(net, fixture_input), _expected(name), atol=1e-6, rtol=0)
    assert imret.weights.load_model(path).dim == dim  # the old import path

    torch.manual_seed(123)  # loaded into a model built from scratch (a whole-network weights file)
    fresh = load_weights(create_model(**kwargs, pretrained=False), path)
    np.testing.assert_allclose(_descriptors(fresh, fixture_input), _expected(name), atol=1e-6, rtol=0)

    out = tmp_path / name
    save_model(net, out)
    if name.endswith(".safetensors"):
        assert out.read_bytes() == path.read_bytes()
    else:
        old, new = (torch.load(p, weights_only=True) for p in (path, out))
        assert new["spec"] == old["spec"] and list(new["state_dict"]) == list(old["state_dict"])
        for k, v in old["state_dict"].items():
            assert torch.equal(new["state_dict"][k], v), k


def test_old_state_dict_loads_with_load_state_dict(fixture_input):
    """A first-layout state dict (``pool.*``, ``whiten.*``) loads with plain ``load_state_dict``,
    strictly, also into a copy (the hook survives deepcopy)."""
    name = "test_efficientnet_rmac_whiten.safetensors"
    sd = load_file(FIXTURES / name)
    assert "whiten.weight" in sd and not any(k.startswith("head.") for k in sd)
    net = copy.deepcopy(create_model("test_efficientnet", "rmac", whitening=16, l2_before_whiten=False))
    net.load_state_dict(sd, strict=True)
    np.testing.assert_allclose(_descriptors(net, fixture_input), _expected(name), atol=1e-6, rtol=0)
    wrapped = torch.nn.ModuleDict({"net": create_model("test_efficientnet", "rmac", whitening=16, l2_before_whiten=False)})
    wrapped.load_state_dict({f"net.{k}": v for k, v in sd.items()}, strict=True)  # under a prefix too
    np.testing.assert_allclose(_descriptors(wrapped["net"], fixture_input), _expected(name), atol=1e-6, rtol=0)


def test_old_store_opens_with_the_same_model(fixture_input, tmp_path):
    from imret.index.store import Store

    store = tmp_path / "store"
    shutil.copytree(FIXTURES / "store", store)
    with Store.open(store) as st:
        net = st.model
        assert st.dim == 32 and net.spec.head == "global"
        np.testing.assert_allclose(_descriptors(net, fixture_input), _expected("test_efficientnet_gem_whiten.pt"),
                                   atol=1e-6, rtol=0)


def test_spec_without_head_reads_as_global_and_writes_as_before():
    old = {"backbone": "resnet18", "pool": "gem", "pool_kwargs": {}, "whitening": None, "l2_before_whiten": True,
           "backbone_kwargs": {}, "mean": None, "std": None}
    spec = ModelSpec.from_dict(old)
    assert spec.head == "global" and spec.head_kwargs == {}
    assert spec.to_dict() == old  # the default head is not written: earlier imret reads it
    other = ModelSpec(head="dolg", head_kwargs={"local_dim": 512})
    assert ModelSpec.from_dict(other.to_dict()) == other and other.to_dict()["head"] == "dolg"
    with pytest.raises(ValueError, match=r"unknown model spec keys \['heads'\]"):
        ModelSpec.from_dict({**old, "heads": "global"})


# --- multi-level trunks ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "tf_efficientnet_lite0", "mobilenetv2_100"])
@pytest.mark.parametrize("size", [(97, 131), (64, 64), (33, 47)])
def test_multi_level_backbone_maps(name, size):
    """Two levels: the stride-16 stage as timm's feature_info says, then the final map;
    ceil(H / r) x ceil(W / r)."""
    torch.manual_seed(0)
    trunk, levels = create_backbone(name, (-2, -1))
    assert levels.multi_level and levels.out_indices == (-2, -1)
    info = trunk.feature_info
    assert levels.stages == (len(info) - 2, None)
    assert levels.channels == (info[-2]["num_chs"], trunk_channels(trunk)) and levels.reductions == (16, 32)
    trunk.eval()
    h, w = size
    with torch.inference_mode():
        maps = feature_maps(trunk, levels, torch.randn(2, 3, h, w))
    assert len(maps) == 2
    for m, c, r in zip(maps, levels.channels, levels.reductions):
        assert m.shape == (2, c, math.ceil(h / r), math.ceil(w / r))


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_100"])
def test_multi_level_maps_are_the_stages_and_the_final_map(name):
    """The trunk is the whole model whatever the levels (same weights); its final map is
    forward_features (MobileNet: after conv_head, 1280 channels), the others are the
    stage outputs, compared with forward hooks on the stage modules."""
    torch.manual_seed(0)
    whole, _ = create_trunk(name)
    trunk, levels = create_backbone(name, (1, -2, -1))
    assert list(trunk.state_dict()) == list(whole.state_dict())
    trunk.load_state_dict(whole.state_dict())
    whole.eval(), trunk.eval()
    seen = {}
    for idx in (1, len(whole.feature_info) - 2):
        mod = whole.get_submodule(whole.feature_info[idx]["module"])
        mod.register_forward_hook(lambda m, a, out, idx=idx: seen.__setitem__(idx, out))
    x = torch.randn(1, 3, 96, 80)
    with torch.inference_mode():
        full = whole.forward_features(x)
        maps = feature_maps(trunk, levels, x)
    torch.testing.assert_close(maps[0], seen[1], rtol=0, atol=0)
    torch.testing.assert_close(maps[1], seen[len(whole.feature_info) - 2], rtol=0, atol=0)
    torch.testing.assert_close(maps[2], full, rtol=0, atol=0)
    assert levels.channels[-1] == trunk_channels(whole) == (512 if name == "resnet18" else 1280)


def test_levels_without_the_final_map_stop_early():
    trunk, levels = create_backbone("resnet18", (-3, -2))
    assert levels.stages == (2, 3) and levels.channels == (128, 256) and levels.reductions == (8, 16)
    with torch.inference_mode():
        a, b = feature_maps(trunk.eval(), levels, torch.randn(1, 3, 64, 64))
    assert a.shape == (1, 128, 8, 8) and b.shape == (1, 256, 4, 4)


def test_bad_levels_are_errors():
    with pytest.raises(ValueError, match=r"cannot give the feature maps of stages \(7,\).*valid: -5\.\.4"):
        create_backbone("test_resnet", (7,))
    with pytest.raises(ValueError, match="at least one stage"):
        create_backbone("test_resnet", ())
    with pytest.raises(ValueError, match="must not repeat"):
        create_backbone("test_resnet", (-1, -1))
    with pytest.raises(ValueError, match="same stage twice"):
        create_backbone("test_resnet", (4, -1))


class _TwoLevelHead(Head):
    """A stand-in for a two-branch head (DOLG's shape): GeM of the last two maps, concatenated."""

    levels = (-2, -1)

    def __init__(self, channels, *, pool="gem", pool_kwargs=None, whitening=None, l2_before_whiten=True, scale=1.0):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))

    @property
    def dim(self) -> int:
        return sum(self.channels)

    def forward(self, features):
        local, glob = features
        return F.normalize(torch.cat([gem(local) * self.scale, gem(glob)], dim=1), dim=1)


@pytest.fixture
def two_level_head(monkeypatch):
    monkeypatch.setitem(heads_module._HEADS, "two_level_test", (_TwoLevelHead, "test head"))
    return "two_level_test"


def test_a_two_level_head_fits_the_net_and_checkpoints(two_level_head, tmp_path):
    torch.manual_seed(0)
    net = create_model("mobilenetv2_100", head=two_level_head, head_kwargs={"scale": 2.0})
    assert net.feature_levels.channels == (96, 1280) and net.dim == 1376
    assert net.pool is None and net.whiten is None and net.multiscale_power() == 1.0
    x = torch.randn(2, 3, 67, 83)
    with torch.inference_mode():
        y = net(x)
    _check_descriptors(y, 2, 1376)
    with pytest.raises(TypeError, match="no whitening layer"):
        net.set_whitening(torch.eye(4, 1376))

    # checkpoints: the head's spec and its own key layout (head.*) round-trip
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"two{suffix}"
        save_model(net, path)
        back = load_model(path)
        assert back.spec == net.spec and back.spec.head_kwargs == {"scale": 2.0}
        with torch.inference_mode():
            torch.testing.assert_close(back(x), y)
    assert "head.scale" in load_file(tmp_path / "two.safetensors")
    torch.manual_seed(1)
    other = load_weights(create_model("mobilenetv2_100", head=two_level_head), tmp_path / "two.pt")
    with torch.inference_mode():
        torch.testing.assert_close(other(x), y)

    # a backbone file of the whole trunk (with conv_head, bn2) fills the two-level trunk, all of it
    whole, _ = create_trunk("mobilenetv2_100")
    torch.save(whole.state_dict(), tmp_path / "trunk.pth")
    load_weights(net, tmp_path / "trunk.pth")
    assert set(net.trunk.state_dict()) == set(whole.state_dict())
    for k, v in net.trunk.state_dict().items():
        assert torch.equal(v, whole.state_dict()[k]), k
    bad = {**whole.state_dict(), "extra.weight": torch.zeros(1)}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="unexpected keys .*extra.weight"):
        load_weights(net, tmp_path / "bad.pth")


def test_level_stage_names_stage_and_stride():
    from imret.models.backbones import create_trunk, level_stage

    trunk, _ = create_trunk("resnet18", pretrained=False)
    assert level_stage(trunk, -1) == (None, 32)  # the final map
    assert level_stage(trunk, -2) == (3, 16)  # layer3: DELF's / DOLG's local stage
    assert level_stage(trunk, 1) == (1, 4)
    with pytest.raises(ValueError, match="stage"):
        level_stage(trunk, 7)
