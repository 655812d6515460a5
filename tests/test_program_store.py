"""The compile store (`jaxattr.compilation.ProgramStore`) returns the program asked for or builds it
again: never another program, never a crash, whatever sits under a key.

The store's own cases use a small jitted function (milliseconds to build): a file from another
program, truncated, one bit flipped, a payload rewritten under an intact header, a forgery with a
valid checksum that takes other shapes, a FIFO, a link to /dev/zero, a directory, an oversized
file, and damaged counts. Each is a miss with one warning, the right
result, and (where the key's path can be replaced) a valid file afterwards. The key follows every
value of JAX's configuration, the package versions and XLA's flags. The command-line cases run
`jaxattr explain` in this process on a random-init ResNet-18 at 32 px and compare the maps with
`--no-compile-cache` runs bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import serialize_executable

from _images import noise_images
from jaxattr import cli, compilation
from jaxattr.compilation import PROGRAM_LIMIT, ProgramStore, StoreError, open_store
from jaxattr.models import create_model
from jaxattr.models.weights import save_params

SPEC = jax.ShapeDtypeStruct((3, 4), jnp.float32)
X = jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7


def _double_sin(x):
    return {"y": jnp.sin(x) * 2.0, "total": jnp.sum(x)}


def _cos(x):
    return {"y": jnp.cos(x), "total": jnp.sum(x)}


class Store:
    """A store with its warnings collected and a count of the programs it built."""

    def __init__(self, directory: Path):
        self.warnings: list[str] = []
        self.store = open_store(directory, warn=self.warnings.append)
        self.builds = 0

    def run(self, description: dict, function=_double_sin, spec=SPEC):
        def traced(x):
            self.builds += 1  # Python runs only when the program is traced, i.e. built
            return function(x)

        return self.store.program(description, jax.jit(traced), spec)

    def path(self, description: dict, suffix: str = ".program") -> Path:
        return self.store.path(self.store.key(description), suffix)


def _expected(function=_double_sin):
    return jax.tree_util.tree_map(np.asarray, jax.jit(function)(X))


def _same(result, expected) -> None:
    for name in expected:
        np.testing.assert_array_equal(np.asarray(result[name]), expected[name])


SIN, COS = {"program": "sin"}, {"program": "cos"}


def _tamper_flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x10
    path.write_bytes(bytes(data))


def _tamper_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _tamper_header_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[40] ^= 0x01
    path.write_bytes(bytes(data))


def _tamper_swap_payload(path: Path, store: Store) -> None:
    """The header kept, the payload rewritten: another program's module and executable."""
    store.run(COS, _cos)
    ours, theirs = path.read_bytes(), store.path(COS).read_bytes()
    path.write_bytes(ours[: _payload_start(ours)] + theirs[_payload_start(theirs) :])


def _payload_start(data: bytes) -> int:
    at = len(compilation._MAGIC)
    return at + 8 + int.from_bytes(data[at : at + 8], "big")


def _tamper_foreign(path: Path, store: Store) -> None:
    """Another program's file copied over this one's."""
    store.run(COS, _cos)
    shutil.copyfile(store.path(COS), path)


def _tamper_forged_shapes(path: Path, store: Store) -> None:
    """A forgery under the right key with a valid checksum: the program for a batch of another size."""
    other = jax.ShapeDtypeStruct((1, 4), jnp.float32)
    exported = jax.export.export(jax.jit(_double_sin))(other)
    compiled = jax.jit(exported.call).lower(other).compile()
    store.store._write(path, store.store.key(SIN), [exported.serialize(), serialize_executable.serialize(compiled)[0]])


def _tamper_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _tamper_link_to_zero(path: Path) -> None:
    path.unlink()
    os.symlink("/dev/zero", path)


def _tamper_oversized(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(PROGRAM_LIMIT + 1)  # sparse: no disk used


TAMPERINGS = {
    "one flipped bit": (_tamper_flip_bit, "checksum"),
    "truncated": (_tamper_truncate, "truncated"),
    "header bit": (_tamper_header_bit, ""),
    "payload rewritten": (_tamper_swap_payload, "damaged"),
    "another program": (_tamper_foreign, "another program"),
    "forged shapes": (_tamper_forged_shapes, "other shapes"),
    "fifo": (_tamper_fifo, "FIFO"),
    "link to /dev/zero": (_tamper_link_to_zero, "symbolic link"),
    "oversized": (_tamper_oversized, "more than"),
}


def test_a_stored_program_is_read_back_without_building_it(tmp_path):
    first = Store(tmp_path / "compile")
    _same(first.run(SIN)(X), _expected())
    second = Store(tmp_path / "compile")  # another process, as far as the store knows
    _same(second.run(SIN)(X), _expected())
    assert (first.builds, second.builds) == (1, 0) and first.warnings == second.warnings == []


@pytest.mark.parametrize("tamper", list(TAMPERINGS), ids=list(TAMPERINGS))
def test_a_tampered_program_file_is_a_miss_that_rebuilds_it(tamper, tmp_path):
    function, reason = TAMPERINGS[tamper]
    store = Store(tmp_path / "compile")
    store.run(SIN)
    path = store.path(SIN)
    function(path, store) if function.__code__.co_argcount == 2 else function(path)
    builds, store.warnings[:] = store.builds, []
    _same(store.run(SIN)(X), _expected())
    assert store.builds == builds + 1
    assert len(store.warnings) == 1 and "was not used" in store.warnings[0] and reason in store.warnings[0], store.warnings
    assert stat.S_ISREG(os.lstat(path).st_mode) and path.stat().st_size < PROGRAM_LIMIT  # replaced by a valid file
    fresh = Store(tmp_path / "compile")
    _same(fresh.run(SIN)(X), _expected())
    assert fresh.builds == 0 and fresh.warnings == []


def test_a_directory_at_the_key_is_a_miss_and_the_run_goes_on(tmp_path):
    store = Store(tmp_path / "compile")
    store.path(SIN).mkdir(parents=True)
    for _ in range(2):
        _same(store.run(SIN)(X), _expected())
    assert store.builds == 2
    assert all("directory" in w or "cannot store" in w for w in store.warnings) and len(store.warnings) == 4


def test_damaged_or_forged_counts_are_computed_again(tmp_path):
    store = Store(tmp_path / "compile")
    description = {"value": "classes"}
    assert store.store.count(description, lambda: 1000) == 1000
    path = store.path(description, ".count")
    text = path.read_bytes()
    path.write_bytes(text[:-4] + b"   5")  # edited: the checksum no longer holds
    assert store.store.count(description, lambda: 1000) == 1000
    store.store._write(path, store.store.key(description), [b'"1000"'])  # forged: a string, not a count
    assert store.store.count(description, lambda: 1000) == 1000
    assert len(store.warnings) == 2 and "checksum" in store.warnings[0] and "not a count" in store.warnings[1]
    assert store.store.count(description, lambda: 7) == 1000  # valid again: read, not computed


def test_a_store_others_can_write_or_own_is_refused(tmp_path):
    directory = tmp_path / "compile"
    open_store(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700 == stat.S_IMODE((directory / "programs").stat().st_mode)
    os.chmod(directory / "programs", 0o777)
    with pytest.raises(StoreError, match="writable by others"):
        open_store(directory)
    os.chmod(directory / "programs", 0o700)
    if os.geteuid() == 0:  # only root can give a directory away
        os.chown(directory, 65534, -1)
        with pytest.raises(StoreError, match="belongs to another user"):
            open_store(directory)


# ------------------------------------------------------------------------------------ the key


def _flipped(value):
    if isinstance(value, bool):
        return not value
    return None


def test_every_configuration_value_is_in_the_key(tmp_path, monkeypatch):
    """Each boolean of JAX's configuration flipped in turn changes the key, as do the named values
    that change lowered programs, the package versions and XLA's flags."""
    store = ProgramStore(tmp_path)
    base = store.key(SIN)
    changed = []
    for name, value in sorted(jax.config.values.items()):
        if _flipped(value) is None:
            continue
        try:
            jax.config.update(name, _flipped(value))
        except Exception:  # read only once at start-up
            continue
        try:
            changed.append(store.key(SIN) != base)
        finally:
            jax.config.update(name, value)
    assert len(changed) > 40 and all(changed)
    for name, other in [
        ("jax_default_prng_impl", "unsafe_rbg"),
        ("jax_default_matmul_precision", "bfloat16"),
        ("jax_numpy_dtype_promotion", "strict"),
        ("jax_threefry_partitionable", not jax.config.jax_threefry_partitionable),
        ("jax_enable_x64", not jax.config.jax_enable_x64),
    ]:
        value = jax.config.values[name]
        jax.config.update(name, other)
        try:
            assert store.key(SIN) != base, name
        finally:
            jax.config.update(name, value)
    assert store.key(SIN) == base
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    assert store.key(SIN) != base
    monkeypatch.delenv("XLA_FLAGS")
    version = compilation._version
    for package in compilation.KEY_PACKAGES:
        with monkeypatch.context() as patch:
            patch.setattr(compilation, "_version", lambda name, p=package: "0.0" if name == p else version(name))
            assert store.key(SIN) != base, package


# ------------------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("store")
    save_params(root / "resnet18.safetensors", create_model("resnet18", weights=None).params, model="resnet18")
    return {"root": root, "images": noise_images(root / "images", 2, (40, 48)), "weights": root / "resnet18.safetensors"}


def _explain(setup, out: Path, *options: str) -> int:
    argv = ["explain", str(setup["images"]), "--model", "resnet18", "--weights", str(setup["weights"]), "--crop", "32",
            "--batch-size", "2", "--out", str(out), *options]
    return cli.main(argv)


def _maps(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".npy", ".png")}


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_another_programs_file_under_the_key_gives_the_right_maps(setup, tmp_path, capsys):
    programs = Path(os.environ["JAXATTR_HOME"]) / "compile" / "programs"
    assert _explain(setup, tmp_path / "saliency", "--method", "saliency") == 0
    saliency = set(programs.glob("*.program"))
    assert _explain(setup, tmp_path / "guided", "--method", "guided_backprop") == 0
    (guided,) = set(programs.glob("*.program")) - saliency
    (saliency_file,) = saliency
    shutil.copyfile(guided, saliency_file)
    counts = sorted(programs.glob("*.count"))
    for count in counts:  # the class count and the memory per pass, edited to say 5
        data = bytearray(count.read_bytes())
        data[-1:] = b"5"
        count.write_bytes(bytes(data))
    capsys.readouterr()
    assert _explain(setup, tmp_path / "again", "--method", "saliency") == 0
    err = capsys.readouterr().err
    assert err.count("was not used") == 1 + len(counts) and "Traceback" not in err
    assert _explain(setup, tmp_path / "uncached", "--method", "saliency", "--no-compile-cache") == 0
    assert _maps(tmp_path / "again") == _maps(tmp_path / "uncached") != _maps(tmp_path / "guided")
    assert [r["label"] for r in _summary(tmp_path / "again")["images"]] == [r["label"] for r in _summary(tmp_path / "uncached")["images"]]
    assert not (Path(os.environ["JAXATTR_HOME"]) / "compile" / "xla").exists()  # JAX's unverified cache is not used
    saliency_file.unlink()
    saliency_file.mkdir()  # a directory at the key: passed over, and it cannot be replaced
    assert _explain(setup, tmp_path / "directory", "--method", "saliency") == 0
    err = capsys.readouterr().err
    assert "a directory, not a regular file" in err and "cannot store" in err and "cannot write the summary" not in err
    assert _maps(tmp_path / "directory") == _maps(tmp_path / "uncached")


def test_a_prng_implementation_change_is_a_miss(setup, tmp_path):
    """SmoothGrad under rbg then unsafe_rbg (both with 4-word keys, so the program's shapes agree):
    the second is built anew and equals an uncached run under unsafe_rbg."""
    impl = jax.config.jax_default_prng_impl
    try:
        for name in ("rbg", "unsafe_rbg"):
            jax.config.update("jax_default_prng_impl", name)
            assert _explain(setup, tmp_path / name, "--method", "smoothgrad", "--samples", "2") == 0
        assert _explain(setup, tmp_path / "uncached", "--method", "smoothgrad", "--samples", "2", "--no-compile-cache") == 0
    finally:
        jax.config.update("jax_default_prng_impl", impl)
    assert _maps(tmp_path / "unsafe_rbg") == _maps(tmp_path / "uncached") != _maps(tmp_path / "rbg")


def test_an_unsafe_store_is_one_line(setup, tmp_path, capsys):
    home = Path(os.environ["JAXATTR_HOME"])
    (home / "compile").mkdir(parents=True)
    os.chmod(home / "compile", 0o777)
    assert _explain(setup, tmp_path / "out", "--method", "saliency") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "writable by others" in err and "--no-compile-cache" in err
    assert not (tmp_path / "out").exists()
