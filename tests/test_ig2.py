"""IG2 / GradPath against an independent PyTorch implementation of the authors' loop
(converters/references/ig2.py: one explicand at a time, the notebooks' callback, a forward hook on
the input of the torchvision model's final Linear), plus the spec's property checks (A.3, §3)."""

import json
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxattr import ConfigError, cli, explain, maps, paths
from jaxattr.config import Config, config, static
from jaxattr.methods import base as method_base
from jaxattr.methods.base import ExtraOutput, MethodSpec
from jaxattr.methods.ig2 import IG2Config, gradpath, ig2, ig2_result, select_references
from jaxattr.models import Model
from jaxattr.models.resnet import ResNet
from jaxattr.models.vgg import VGG
from jaxattr.models.vit import VisionTransformer
from _devices import report_on_four_devices

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from converters import crosscheck  # noqa: E402
from converters.references.ig2 import reference_options, run_reference  # noqa: E402
from converters.torch_models import PixelInput, randomise_constants, with_torch_weights  # noqa: E402

SIZE = 32
ALL = dict(selection="all", num_references=None)  # the reference uses every reference it is given
CONFIG = IG2Config(steps=3, **ALL)  # shared by several tests: one compiled program per dtype and shape


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _twin(module: torch.nn.Module, classifier, name: str) -> tuple[PixelInput, Model]:
    module = randomise_constants(module, seed=1).eval()
    model = with_torch_weights(classifier, module, SIZE, name)
    return PixelInput(module, classifier.mean, classifier.std).eval(), model


def small_resnet() -> tuple[PixelInput, Model]:
    """A torchvision ResNet with one basic block per stage and 10 classes, random weights (BatchNorm
    statistics included), and its jaxattr twin."""
    torch.manual_seed(0)
    module = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    return _twin(module, ResNet(block="basic", depths=(1, 1, 1, 1), num_classes=10), "small-resnet")


def small_vgg() -> tuple[PixelInput, Model]:
    """A torchvision VGG with two small conv stages (and its 4096-wide classifier), 10 classes."""
    layers = [8, "M", 16, "M"]
    torch.manual_seed(0)
    module = torchvision.models.vgg.VGG(torchvision.models.vgg.make_layers(layers), num_classes=10)
    module.classifier[0] = torch.nn.Linear(16 * 7 * 7, 4096)  # torchvision assumes 512 channels
    return _twin(module, VGG(config=tuple(layers), num_classes=10), "small-vgg")


@pytest.fixture(scope="module")
def twin():
    return small_resnet()


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture
def model64(twin, x64):
    """The jaxattr ResNet twin in float64 (the property checks: exact up to rounding)."""
    return twin[1].astype(np.float64)


def _in(dtype, twin):
    torch_model, model = twin
    wide = dtype == np.float64
    return crosscheck._cast_weights(torch_model, torch.float64 if wide else torch.float32), model.astype(dtype)


def _inputs(dtype, batch=2, references=2, seed=0):
    rng = np.random.RandomState(seed)
    images = rng.rand(batch, SIZE, SIZE, 3).astype(dtype)
    refs = rng.rand(batch, references, SIZE, SIZE, 3).astype(dtype)
    refs[:, 0] = images[::-1]  # each explicand's first reference: the other explicand
    return images, refs


TARGETS = np.array([3, 7], np.int32)


def _parity(twin, dtype, config, refs=None):
    """(max rel. difference of the GradPath points, of the maps) vs the PyTorch reference."""
    torch_model, model = _in(dtype, twin)
    images, default_refs = _inputs(dtype)
    refs = default_refs if refs is None else refs
    ours = ig2_result(model, images, TARGETS, references=refs, config=config, return_path=True)
    theirs, their_paths = run_reference(torch_model, images, refs, TARGETS, **reference_options(config))
    their_points = np.stack([np.stack(p, axis=1) for p in their_paths])  # (b, r, K+1, h, w, 3), raw units
    our_points = np.asarray(ours.path.points) * config.value_scale
    return _rel(our_points, their_points), _rel(ours.attributions, theirs)


@pytest.mark.parametrize("space", ["normalized", "input"])
def test_path_and_map_match_the_reference_float32(twin, space):
    # Few steps: fixed-length normalised steps amplify float32 differences along the path (§2.4).
    with jax.enable_x64(False):
        path, mask = _parity(twin, np.float32, CONFIG.replace(gradient_space=space))
    assert path <= 1e-5 and mask <= 1e-5, (path, mask)


@pytest.mark.parametrize("space", ["normalized", "input"])
def test_path_and_map_match_the_reference_float64(twin, x64, space):
    path, mask = _parity(twin, np.float64, CONFIG.replace(gradient_space=space))
    assert path <= 1e-10 and mask <= 1e-10, (path, mask)


def test_vgg_classifier_input_matches_the_reference(x64):
    # VGG's final Linear reads classifier.5 (after a ReLU and a dropout): the reference's hook and
    # the declared classifier input must agree. Probability output, as PAIR's own notebook uses.
    path, mask = _parity(small_vgg(), np.float64, CONFIG.replace(output="probability"))
    assert path <= 1e-10 and mask <= 1e-10, (path, mask)


def test_crosscheck_runner(twin):
    images, refs = _inputs(np.float64)
    result = crosscheck.run("ig2", twin[1], twin[0], images, TARGETS, config=CONFIG, references=refs)
    assert result.dtype == "float64" and result.ok, result


# ----------------------------------------------------------------------------- properties


def test_a_reference_identical_to_the_explicand_stays_and_gives_no_nan(twin, x64):
    torch_model, model = _in(np.float64, twin)
    images, refs = _inputs(np.float64)
    refs[:, 1] = images  # a reference equal to its explicand: zero distance, zero gradient
    result = ig2_result(model, images, TARGETS, references=refs, config=CONFIG, return_path=True)
    points = np.asarray(result.path.points[:, 1])
    np.testing.assert_array_equal(points, np.broadcast_to(images[:, None], points.shape))
    assert np.isfinite(np.asarray(result.attributions)).all()
    with np.errstate(invalid="ignore"):
        nan, _ = run_reference(torch_model, images, refs, TARGETS, **reference_options(CONFIG))
    assert np.isnan(nan).all()  # the reference divides by the zero norm (the bug jaxattr fixes)
    # The staying path adds nothing; the mean over the two references halves the other's map.
    other, _ = run_reference(torch_model, images, refs[:, :1], TARGETS, **reference_options(CONFIG))
    assert _rel(result.attributions, other / 2) <= 1e-10


def test_batched_explicands_and_references_equal_single_runs(model64):
    images, refs = _inputs(np.float64)
    together = ig2_result(model64, images, TARGETS, references=refs, config=CONFIG)
    for i in range(2):
        singles = [ig2_result(model64, images[i : i + 1], TARGETS[i : i + 1], references=refs[i, r : r + 1], config=CONFIG) for r in range(2)]
        assert _rel(together.attributions[i], np.mean([s.attributions[0] for s in singles], axis=0)) <= 1e-12
        for r, single in enumerate(singles):
            assert _rel(together.path.counterfactuals[i, r], single.path.counterfactuals[0, 0]) <= 1e-12


def test_chunks_change_nothing(model64):
    images, refs = _inputs(np.float64)
    # chunk 1: a loop over one-step chunks; chunk 2 of 3 steps: one chunk without a loop, then the rest
    one, two = (ig2_result(model64, images, TARGETS, references=refs, config=CONFIG.replace(chunk=c)) for c in (1, 2))
    assert _rel(two.attributions, one.attributions) <= 1e-12
    assert _rel(two.path.counterfactuals, one.path.counterfactuals) <= 1e-12  # rounding only


def test_completeness_in_input_space(model64):
    rng = np.random.RandomState(1)
    images, refs = rng.rand(2, SIZE, SIZE, 3), rng.rand(2, SIZE, SIZE, 3)  # one set: each explicand uses both
    config = IG2Config(steps=20, step_size=4.0, gradient_space="input", **ALL)
    result = ig2_result(model64, images, references=refs, config=config)
    targets = _classes(model64, images)
    pick = lambda x, t: np.take_along_axis(np.asarray(model64(jnp.asarray(x))), t[:, None], axis=-1)[:, 0]
    counterfactuals = np.asarray(result.path.counterfactuals)  # (2, 2, h, w, 3)
    y_cf = pick(counterfactuals.reshape(-1, SIZE, SIZE, 3), np.repeat(targets, 2)).reshape(2, 2)
    change = pick(images, targets) - y_cf.mean(axis=1)
    total = np.asarray(result.attributions).sum(axis=(1, 2, 3))
    # A random net's kinks make a sum of 20 steps err by a fixed amount: meaningful when the
    # score changes well above it, as here.
    assert (np.abs(change) > 0.02).all(), change
    np.testing.assert_allclose(total, change, rtol=0.01)
    np.testing.assert_allclose(result.completeness_delta, total - change, atol=1e-12)
    # the search's sign: each path ends nearer its reference's representation than it started
    rep = lambda x: np.asarray(model64.representation(jnp.asarray(x)))
    for j in range(2):
        distance = lambda x: np.linalg.norm(rep(x) - rep(refs[j : j + 1]), axis=-1)
        assert (distance(counterfactuals[:, j]) < distance(images)).all()


def test_step_lengths_and_clipping(model64):
    images, refs = _inputs(np.float64)
    big = CONFIG.replace(step_size=2000.0)  # large steps: clipping shortens them
    searched = gradpath(model64, images, TARGETS, references=refs, config=big, return_path=True)
    integrated = ig2_result(model64, images, TARGETS, references=refs, config=big, return_path=True)
    assert _rel(searched.points, integrated.path.points) <= 1e-12  # the search alone is the same search
    points = np.asarray(searched.points) * 255
    assert points.min() >= -1e-9 and points.max() <= 255 + 1e-9  # pixels x 255: rounding only
    lengths = np.linalg.norm(np.diff(points, axis=2).reshape(2, 2, 3, -1), axis=-1)
    assert (lengths <= 2000 * (1 + 1e-12)).all() and (lengths < 1999).any()
    middle = images * 0.5 + 0.25  # no clipping: every step is exactly step_size long
    small = CONFIG.replace(step_size=1.0)
    points = np.asarray(gradpath(model64, middle, TARGETS, references=refs, config=small, return_path=True).points) * 255
    np.testing.assert_allclose(np.linalg.norm(np.diff(points, axis=2).reshape(2, 2, 3, -1), axis=-1), 1.0, rtol=1e-9)


def test_polyline_of_a_straight_line_is_riemann_right():
    # §3.1: IG2's integration on the straight path is the right Riemann rule with n = K.
    start, end = jnp.array([[0.2, -1.0, 3.0]]), jnp.array([[1.0, 2.0, -0.5]])
    score = lambda p: jnp.sum(jnp.sin(p) * p**2, axis=-1)
    k = 7
    vertices = start[None] + jnp.arange(k + 1)[:, None, None] / k * (end - start)[None]
    polyline = paths.Polyline(vertices)
    ours = paths.integrate(score, polyline, polyline.rule())
    gradient = jax.grad(lambda p: score(p).sum())
    right = sum(gradient(vertices[j]) for j in range(1, k + 1)) * (end - start) / k
    np.testing.assert_allclose(ours, right, rtol=1e-6)


# ------------------------------------------------------------------------- references


def _classes(model, x):
    return np.asarray(jnp.argmax(model(jnp.asarray(x)), axis=-1))


def _pool(model, size=6, seed=5):
    """Explicands and a pool of random images, predicted as at least two classes."""
    rng = np.random.RandomState(seed)
    for _ in range(20):
        images, pool = rng.rand(2, SIZE, SIZE, 3), rng.rand(size, SIZE, SIZE, 3)
        if len(set(_classes(model, pool))) > 1:
            return images, pool
    raise AssertionError("no pool with two classes")


def test_selection_rules(model64):
    images, pool = _pool(model64)
    classes = _classes(model64, pool)
    targets = np.array([classes[0], classes[classes != classes[0]][0]], np.int32)  # both among the pool's
    config = IG2Config(num_references=None)
    _, weights, indices = select_references(model64, images, targets, references=pool, config=config)
    np.testing.assert_array_equal(indices, np.tile(np.arange(6), (2, 1)))
    np.testing.assert_array_equal(np.asarray(weights) > 0, classes[None, :] != targets[:, None])
    np.testing.assert_allclose(np.asarray(weights).sum(axis=1), 1.0)
    relevant = config.replace(selection="relevant", relevant_classes=3)
    _, weights, _ = select_references(model64, images, references=pool, config=relevant)
    ranked = np.argsort(-np.asarray(model64(jnp.asarray(images))), axis=-1)[:, 1:3]  # the 2nd and 3rd classes
    np.testing.assert_array_equal(np.asarray(weights) > 0, (classes[None, :, None] == ranked[:, None, :]).any(-1))


def test_drawn_references_follow_the_key(model64):
    images, pool = _pool(model64, size=8)
    config = IG2Config(num_references=3, selection="all")
    draw = lambda key: np.asarray(select_references(model64, images, references=pool, config=config, key=key)[2])
    first = draw(jax.random.key(0))
    assert first.shape == (2, 3) and all(len(set(row)) == 3 for row in first)  # without replacement
    np.testing.assert_array_equal(draw(jax.random.key(0)), first)
    assert any((draw(jax.random.key(s)) != first).any() for s in range(1, 4))
    with pytest.raises(ValueError, match="needs a key"):
        select_references(model64, images, references=pool, config=config)


def test_fewer_qualifying_references_than_slots(model64):
    images, pool = _pool(model64)
    classes = _classes(model64, pool)
    target = int(classes[0])
    config = IG2Config(num_references=4)
    _, weights, indices = select_references(model64, images, target, references=pool, config=config, key=jax.random.key(0))
    qualifying = set(np.flatnonzero(classes != target))
    for w, i in zip(np.asarray(weights), np.asarray(indices)):
        used = set(i[w > 0])
        assert used <= qualifying and len(used) == min(4, len(qualifying))
    # no qualifying reference at all: zero weights, so a zero map (Σ_r w_r a_r), never 0/0
    same = pool[classes == target]
    _, weights, _ = select_references(model64, images, target, references=same, config=config, key=jax.random.key(0))
    assert not np.asarray(weights).any()


def test_default_reference_and_explain(model64):
    images, refs = _inputs(np.float64)
    defaults, weights, _ = select_references(model64, images, config=CONFIG)  # no references: black
    assert defaults.shape == (2, 1, SIZE, SIZE, 3) and not np.asarray(defaults).any() and (np.asarray(weights) == 1).all()
    options = dict(steps=CONFIG.steps, **ALL)
    per_image = explain(model64, images, "ig2", references=refs, targets=TARGETS, **options)
    np.testing.assert_array_equal(per_image.attributions, ig2(model64, images, TARGETS, references=refs, config=CONFIG))
    shared = explain(model64, images, "ig2", references=refs[0], targets=TARGETS, **options)
    assert _rel(shared.attributions, ig2(model64, images, TARGETS, references=np.stack([refs[0]] * 2), config=CONFIG)) <= 1e-12
    assert shared.maps.shape == (2, SIZE, SIZE)
    with pytest.raises(ValueError, match="takes no references"):
        explain(model64, images, "saliency", references=refs[0])


def test_representation_is_what_the_final_linear_reads(twin):
    resnet = twin[1]
    x = jnp.asarray(np.random.RandomState(8).rand(2, SIZE, SIZE, 3).astype(np.float32))
    fc = resnet.params["fc"]
    np.testing.assert_allclose(resnet.representation(x) @ fc["kernel"] + fc["bias"], resnet(x), rtol=1e-5, atol=1e-5)
    assert resnet.representation(x, "layer4").shape == (2, 512)  # any other layer: its whole output
    vit_module = VisionTransformer(patch_size=8, width=16, depth=2, num_heads=2, mlp_dim=32, num_classes=5, image_size=SIZE)
    vit = Model(vit_module, vit_module.init(jax.random.key(1), x)["params"], "tiny-vit")
    head = vit.params["head"]
    features = vit.representation(x)  # the class token of the final norm
    assert features.shape == (2, 16)
    np.testing.assert_allclose(features @ head["kernel"] + head["bias"], vit(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ bad input


def test_bad_input(model64):
    images, refs = _inputs(np.float64)
    with pytest.raises(ValueError, match="no references"):
        ig2(model64, images, TARGETS, references=refs[:, :0], config=CONFIG)
    with pytest.raises(ValueError, match="one per image"):
        ig2(model64, images, TARGETS, references=refs[:1], config=CONFIG)
    with pytest.raises(ValueError, match="clip range"):
        ig2(model64, images, TARGETS, references=refs, config=CONFIG.replace(clip_min=10.0))
    for field, value in (("step_size", -1.0), ("step_size", 0.0), ("clip_max", -1.0), ("value_scale", 0.0)):
        with pytest.raises(ConfigError) as error:
            CONFIG.replace(**{field: value})
        assert error.value.field == field
    with pytest.raises(ValueError, match="unknown layer"):
        ig2(model64, images, TARGETS, references=refs, config=CONFIG.replace(layer="head7"))
    with pytest.raises(TypeError, match="jaxattr Model"):
        ig2(lambda x: model64(x), images, TARGETS, references=refs, config=CONFIG)
    with pytest.warns(UserWarning, match="resized"):  # references of another size: resized, said so
        resized = ig2(model64, images, TARGETS, references=refs[:, :, ::2, ::2], config=CONFIG)
    assert resized.shape == images.shape and np.isfinite(np.asarray(resized)).all()

    class Headless(ResNet):  # an architecture that declares no final linear classifier
        classifier_input = ""

    headless = Model(Headless(block="basic", depths=(1, 1, 1, 1), num_classes=10), model64.params, model64.name)
    with pytest.raises(ValueError, match="declares no final linear classifier.*layer4.0, avgpool, fc"):
        ig2(headless, images, TARGETS, references=refs, config=CONFIG)
    # naming the layer works, and 'avgpool' is what the ResNet's default reads
    named = ig2(headless, images, TARGETS, references=refs, config=CONFIG.replace(layer="avgpool"))
    assert _rel(named, ig2(model64, images, TARGETS, references=refs, config=CONFIG)) <= 1e-12


# ------------------------------------------------------------------------- 4 CPU devices

SHARDED = textwrap.dedent(
    """
    import importlib.util, json, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jaxattr import explain, method
    spec = importlib.util.spec_from_file_location("t", sys.argv[1])
    t = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(t)
    assert len(jax.devices()) == 4, jax.devices()
    model = t.small_resnet()[1].astype(np.float64)
    rng = np.random.RandomState(0)
    x, pool = rng.rand(3, t.SIZE, t.SIZE, 3), rng.rand(5, t.SIZE, t.SIZE, 3)
    bound = method("ig2", steps=3, step_size=64.0, num_references=2, selection="all", chunk=2)
    keys = jax.random.split(jax.random.key(1), 3)
    report = {}
    # one set drawn from with per-image keys (repeated per image inside); one set per explicand
    for name, refs, key in (("shared, per-image keys", pool, keys),
                            ("per explicand, one key", np.stack([pool[:3], pool[1:4], pool[2:5]]), jax.random.key(1))):
        one = explain(model, x, bound, key=key, references=refs)
        many = explain(model, x, bound, key=key, references=refs, devices=jax.devices())
        report[name] = [t._rel(many.attributions, one.attributions), t._rel(many.maps, one.maps)]
    print("REPORT" + json.dumps(report))
    """
)


@pytest.mark.slow  # a subprocess compiling four programs (~50 s of CPU)
def test_four_cpu_devices_change_nothing():
    report = json.loads(report_on_four_devices(SHARDED, __file__))
    for name, diffs in report.items():
        assert max(diffs) <= 1e-12, (name, diffs)  # float64: the same arithmetic, split over devices


# ---------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    """Random-init ResNet-18 weights and two noise photos, the second also a reference."""
    from jaxattr.models import create_model
    from jaxattr.models.weights import save_params

    root = tmp_path_factory.mktemp("cli")
    weights = root / "resnet18.safetensors"
    save_params(weights, create_model("resnet18", weights=None).params, model="resnet18")
    photos = root / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    return weights, photos


def _cli(setup, out, *extra) -> int:
    weights, photos = setup
    return cli.main(["explain", str(photos / "p0.png"), "--model", "resnet18", "--weights", str(weights), "--out", str(out), *extra])


@pytest.fixture
def reference_probe(monkeypatch):
    """A registered method that takes references and has an extra output, and records its inputs."""
    seen = []

    @config
    class ProbeConfig(Config):
        num_references: int | None = static(8)

    def probe(model, images, targets=None, *, config=None, key=None, references=None):
        seen.append((references, key))
        return images - jnp.mean(references, axis=0)

    def with_first(model, images, targets=None, *, config=None, key=None, references=None):
        first = jnp.broadcast_to(references[0], images.shape)
        return probe(model, images, targets, config=config, key=key, references=references), {"first": first}

    def pictures(extras):
        return {"first": extras["first"], "grey": extras["first"][..., 0]}

    spec = MethodSpec(
        "refprobe", probe, ProbeConfig, "test", saliency=maps.abs_sum, contrast=maps.Contrast(),
        takes_references=True, extras=with_first,
        extra_outputs=(ExtraOutput("save-firsts", "the first reference", ("first",), pictures),),
    )
    monkeypatch.setitem(method_base._METHODS, "refprobe", spec)
    return seen


def test_cli_loads_references_and_writes_extra_pictures(cli_setup, tmp_path, reference_probe, capsys):
    out = tmp_path / "out"
    assert _cli(cli_setup, out, "--method", "refprobe", "--references", str(cli_setup[1]), "--save-firsts") == 0
    # Traced into the run's one program, whose argument the references are: the method sees their
    # shape, and its extra output (the first reference, drawn) shows the values that reached it.
    references, key = reference_probe[-1]
    assert references.shape == (2, 224, 224, 3)  # the model's eval transform, like the inputs
    assert key is not None  # methods taking references may draw among them: per-file keys
    from jaxattr.image import Preprocessing, load_image
    from jaxattr.models import model_info

    first = load_image(cli_setup[1] / "p0.png", Preprocessing.of(model_info("resnet18")))
    drawn = np.asarray(Image.open(out / "p0_first.png"))
    np.testing.assert_array_equal(drawn, np.round(np.clip(first, 0, 1) * 255).astype(np.uint8))
    assert "refprobe: 2 reference images, fewer than --num-references 8" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.png")) == ["p0.png", "p0_first.png", "p0_grey.png"]
    assert sorted(p.name for p in out.glob("*.npy")) == ["p0.npy"]  # pictured extras are not saved as arrays
    plain = tmp_path / "plain"  # without the flag: the map alone
    assert _cli(cli_setup, plain, "--method", "refprobe", "--references", str(cli_setup[1])) == 0
    assert sorted(p.name for p in plain.iterdir() if p.suffix in (".png", ".npy")) == ["p0.npy", "p0.png"]
    assert _cli(cli_setup, tmp_path / "k", "--method", "refprobe", "--references", str(cli_setup[1]), "--save-firsts", "--top-k", "2") == 2
    assert "--save-firsts writes one class per image: drop --top-k" in capsys.readouterr().err
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert [Path(p).name for p in settings["references"]] == ["p0.png", "p1.png"] and "seed" in settings


def test_cli_reference_errors_are_one_line(cli_setup, tmp_path, reference_probe, capsys):
    for extra, status, message in (
        (("--references", str(tmp_path / "missing")), 1, "--references: no such file or directory"),
        (("--references", str(tmp_path)), 1, "--references: no image files in"),
        (("--method", "saliency", "--references", str(cli_setup[1])), 2, "saliency has no option --references (an option of"),
    ):
        method = () if "--method" in extra else ("--method", "refprobe")
        assert _cli(cli_setup, tmp_path / "out", *method, *extra) == status
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) <= 2 and message in err[-1], err  # (a note on the references may precede it)


@pytest.mark.slow  # two IG2 programs on ResNet-18 at 224 px
def test_cli_ig2_with_references_and_gradcf_pictures(cli_setup, tmp_path):
    out = tmp_path / "out"
    options = ["--method", "ig2", "--references", str(cli_setup[1]), "--steps", "1", "--selection", "all", "--save-path"]
    assert _cli(cli_setup, out, *options) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["p0.png", "p0_gradcf0.png", "p0_gradcf1.png"]
    assert np.isfinite(np.load(out / "p0.npy")).all()
