"""Model-config validation (a wrong value raises ConfigError naming the dotted key path and what is allowed),
registry mechanics, short ids for run names, and the package's lazy exports."""
import subprocess
import sys

import pytest

from hqlt.blocks import BLEND, FW, KV, MIX, REGISTRIES, ConfigError, Registry
from hqlt.blocks.model_schema import MixerConfig, ModelConfig, model_config


def make(**kw):
    return model_config({"vocab_size": 8, **kw})


# (overrides, dotted path, fragments the message must contain: the allowed values / the rule)
BAD = {
    "unknown mixer key, with suggestion": (
        {"mixer": {"mx": "vector"}}, "model.mixer.mx",
        ["unknown key", "allowed: kv, fw, blend, mix, short_conv, conv_size, output_gate", "did you mean 'mix'"]),
    "unknown model key": ({"d_modle": 64}, "model.d_modle", ["unknown key", "did you mean 'd_model'"]),
    "unknown kv name": ({"mixer": {"kv": "flash"}}, "model.mixer.kv", ["unknown kv 'flash'", "allowed: softmax"]),
    "unknown kv name in a mapping": ({"mixer": {"kv": {"name": "sofmax", "window": 8}}}, "model.mixer.kv.name",
                                     ["allowed: softmax", "did you mean 'softmax'"]),
    "kv mapping without name": ({"mixer": {"kv": {"window": 8}}}, "model.mixer.kv.name", ["missing", "allowed: softmax"]),
    "unknown fw name": ({"mixer": {"fw": "deltanet"}}, "model.mixer.fw",
                        ["unknown fw 'deltanet'", "allowed: delta, gated_delta, linear"]),
    "unknown blend": ({"mixer": {"blend": "delayed"}}, "model.mixer.blend",
                      ["unknown blend 'delayed'", "allowed: delayed_chunk, delayed_stream, sync"]),
    "unknown mix": ({"mixer": {"mix": "gate"}}, "model.mixer.mix",
                    ["unknown mix 'gate'", "allowed: dynamic_scalar, static_scalar, sum, vector"]),
    "beta_range 3": ({"mixer": {"fw": {"name": "delta", "beta_range": 3}}}, "model.mixer.fw.beta_range",
                     ["got 3", "allowed: 1, 2"]),
    "beta_range true (bool is not 1)": ({"mixer": {"fw": {"name": "gated_delta", "beta_range": True}}},
                                        "model.mixer.fw.beta_range", ["got True", "allowed: 1, 2"]),
    "option of an entry without options": ({"mixer": {"fw": {"name": "linear", "beta_range": 2}}},
                                           "model.mixer.fw.beta_range", ["unknown key"]),
    "window 0": ({"mixer": {"kv": {"name": "softmax", "window": 0}}}, "model.mixer.kv.window",
                 ["got 0", "integer >= 1", "null"]),
    "window not an integer": ({"mixer": {"kv": {"name": "softmax", "window": 2.5}}}, "model.mixer.kv.window",
                              ["got 2.5", "expected int or null"]),
    "pos alibi": ({"mixer": {"kv": {"name": "softmax", "pos": "alibi"}}}, "model.mixer.kv.pos",
                  ["got 'alibi'", "allowed: 'rope', 'none'"]),
    "rope_theta 0": ({"mixer": {"kv": {"name": "softmax", "rope_theta": 0}}}, "model.mixer.kv.rope_theta", ["> 0"]),
    "layers bad letter": ({"layers": "HXK", "n_layers": 3}, "model.layers[1]", ["got 'X'", "H (hqlt), K (kv), F (fw)"]),
    "layers bad list item": ({"layers": ["hqlt", "mamba"], "n_layers": 2}, "model.layers[1]",
                             ["got 'mamba'", "H (hqlt), K (kv), F (fw)"]),
    "layers wrong length": ({"layers": "HK", "n_layers": 3}, "model.layers",
                            ["got 2 layer kinds for n_layers=3", "one kind or exactly n_layers"]),
    "layers not a string or list": ({"layers": 5}, "model.layers", ["got 5", "str or list"]),
    "n_heads not dividing d_model": ({"d_model": 16, "n_heads": 3}, "model.n_heads", ["got 3", "must divide d_model=16"]),
    "n_heads 0": ({"n_heads": 0}, "model.n_heads", ["got 0", "integer >= 1"]),
    "hybrid layers with window null": ({"mixer": {"kv": {"name": "softmax", "window": None}}}, "model.mixer.kv.window",
                                       ["hybrid (H) layers need a KV window", "integer >= 1"]),
    "hybrid in a pattern with window null": ({"layers": "KKH", "n_layers": 3,
                                              "mixer": {"kv": {"name": "softmax", "window": None}}},
                                             "model.mixer.kv.window", ["K layers only"]),
    "negative init_std": ({"init_std": -0.02}, "model.init_std", ["got -0.02", "allowed: > 0"]),
    "d_model 'big'": ({"d_model": "big"}, "model.d_model", ["got 'big'", "expected an integer"]),
    "short_conv 'yes'": ({"mixer": {"short_conv": "yes"}}, "model.mixer.short_conv", ["expected true or false"]),
    "conv_size 0": ({"mixer": {"conv_size": 0}}, "model.mixer.conv_size", ["got 0", ">= 1"]),
    "mixer not a mapping": ({"mixer": ["vector"]}, "model.mixer", ["expected a mapping", "kv, fw, blend, mix"]),
    "fw not a name or mapping": ({"mixer": {"fw": 3}}, "model.mixer.fw", ["got 3", "expected a fw name"]),
    "negative vocab": ({"vocab_size": -1}, "model.vocab_size", ["got -1", ">= 1"]),
    "mlp_ratio 0": ({"mlp_ratio": 0}, "model.mlp_ratio", ["got 0.0", "> 0"]),
    "mlp gelu": ({"mlp": "gelu"}, "model.mlp", ["got 'gelu'", "allowed: 'swiglu', 'none'"]),
    "pos_emb rope": ({"pos_emb": "rope"}, "model.pos_emb", ["got 'rope'", "allowed: 'none', 'learned'"]),
    "learned positions without max_len": ({"pos_emb": "learned"}, "model.max_len",
                                          ["got None", "integer >= 1", "pos_emb: learned"]),
    "learned positions max_len 0": ({"pos_emb": "learned", "max_len": 0}, "model.max_len", ["got 0"]),
    "delayed_chunk fw_chunk 0": ({"mixer": {"blend": {"name": "delayed_chunk", "fw_chunk": 0}}},
                                 "model.mixer.blend.fw_chunk", ["got 0", "integer >= 1", "null"]),
    "fw_chunk on sync": ({"mixer": {"blend": {"name": "sync", "fw_chunk": 64}}}, "model.mixer.blend.fw_chunk",
                         ["unknown key"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_value_names_path_and_allowed(case):
    overrides, path, fragments = BAD[case]
    with pytest.raises(ConfigError) as info:
        make(**overrides)
    err = info.value
    assert err.path == path
    assert str(err).startswith(path + ": ")
    for fragment in fragments:
        assert fragment in err.message, (fragment, err.message)
    assert "\n" not in str(err)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_custom_path_prefix():
    with pytest.raises(ConfigError) as info:
        model_config({"mixer": {"mix": "gate"}}, path="trial.model")
    assert info.value.path == "trial.model.mixer.mix"


def test_defaults_and_coercions():
    cfg = make()
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.pattern) == (128, 2, 4, "HH")
    assert cfg.mixer.part("kv")[1].window == 64 and cfg.mixer.part("kv")[1].pos == "rope"
    assert cfg.mixer.part("fw")[1].beta_range == 2
    assert cfg.mixer.part("blend")[0].name == "sync" and cfg.mixer.part("mix")[0].name == "vector"
    assert not cfg.mixer.short_conv and not cfg.mixer.output_gate and not cfg.tie_embeddings
    # Integral floats become ints (YAML / sweep samples); a Literal's value is normalised to the allowed one.
    cfg = make(d_model=64.0, mixer={"fw": {"name": "delta", "beta_range": 1.0}, "kv": {"name": "softmax", "window": 8.0}})
    assert cfg.d_model == 64 and type(cfg.d_model) is int
    assert cfg.mixer.part("fw")[1].beta_range == 1 and type(cfg.mixer.part("fw")[1].beta_range) is int
    assert cfg.mixer.part("kv")[1].window == 8 and type(cfg.mixer.part("kv")[1].window) is int
    assert cfg.short_id() == "S8-dn1-vec"


def test_mlp_hidden_rule():
    """I = 256·ceil(floor(D·ratio·2/3)/256): D=1024→2816, 2048→5632, 128→512 (docs/hqlt-math.md §2)."""
    for D, hidden in [(1024, 2816), (2048, 5632), (128, 512)]:
        assert make(d_model=D, n_heads=8).mlp_hidden == hidden
    assert make(d_model=30, n_heads=5, mlp_ratio=2.5, mlp_multiple_of=7).mlp_hidden == 56  # floor(50) → 7·8


def test_config_objects_are_accepted_and_revalidated():
    cfg = make(layers="HK")
    assert model_config(cfg) is cfg
    direct = ModelConfig(vocab_size=8, layers="F", mixer=MixerConfig(fw={"name": "delta", "beta_range": 1}))
    assert model_config(direct).short_id() == "dn1"
    with pytest.raises(ConfigError, match=r"model\.mixer\.mix: unknown mix"):
        model_config(ModelConfig(vocab_size=8, mixer=MixerConfig(mix="gate")))


# ------------------------------------------------------------------------------ short ids
SHORT_IDS = [
    ({}, "S64-dn2-vec"),
    ({"mixer": {"kv": {"name": "softmax", "window": 8}, "fw": {"name": "delta", "beta_range": 1}, "mix": "sum"}},
     "S8-dn1-sum"),
    ({"mixer": {"blend": "delayed_stream", "mix": "static_scalar"}}, "D64-dn2-ss"),
    ({"mixer": {"blend": "delayed_chunk", "mix": "dynamic_scalar", "fw": "gated_delta"}}, "C64-gdn2-ds"),
    ({"mixer": {"fw": "linear", "kv": {"name": "softmax", "window": 16, "pos": "none"}}}, "S16-lin-vec-np"),
    ({"layers": "K", "mixer": {"kv": {"name": "softmax", "window": None}}}, "T"),
    ({"layers": "K", "mixer": {"kv": {"name": "softmax", "window": None, "pos": "none"}}}, "T-np"),
    ({"layers": "K", "mixer": {"kv": {"name": "softmax", "window": 8}}}, "SWA8"),
    ({"layers": "K", "mixer": {"kv": {"name": "softmax", "window": 8, "pos": "none"}}}, "SWA8-np"),
    ({"layers": "F", "mixer": {"fw": {"name": "delta", "beta_range": 1}}}, "dn1"),
    ({"layers": "F", "mixer": {"fw": "gated_delta"}}, "gdn2"),
    ({"layers": "F", "mixer": {"fw": "linear"}}, "lin"),
    ({"layers": "HHKH", "n_layers": 4}, "HHKH_S64-dn2-vec_SWA64"),
    ({"layers": ["kv", "fw", "kv"], "n_layers": 3, "mixer": {"kv": {"name": "softmax", "window": None}}}, "KFK_T_dn2"),
    ({"layers": "HKF", "n_layers": 3, "mixer": {"kv": {"name": "softmax", "window": 32, "pos": "none"},
                                                "blend": "delayed_chunk", "mix": "sum"}},
     "HKF_C32-dn2-sum-np_SWA32-np_dn2"),
    ({"mixer": {"kv": {"name": "softmax", "window": 8, "pos": "none"},
                "blend": {"name": "delayed_chunk", "fw_chunk": 64}}}, "R64C8-dn2-vec-np"),
    ({"layers": "K", "mlp": "none", "pos_emb": "learned", "max_len": 256,
      "mixer": {"kv": {"name": "softmax", "window": None, "pos": "none"}}}, "T-np-nomlp-ape256"),
    ({"layers": "HKF", "n_layers": 3, "mlp": "none"}, "HKF_S64-dn2-vec_SWA64_dn2-nomlp"),
]


@pytest.mark.parametrize("overrides,short", SHORT_IDS, ids=[s for _, s in SHORT_IDS])
def test_short_ids(overrides, short):
    assert make(**overrides).short_id() == short


def test_short_ids_distinguish_every_registry_entry():
    ids = set()
    for blend in BLEND.names():
        for fw in [{"name": "delta", "beta_range": 1}, {"name": "delta", "beta_range": 2}, "gated_delta", "linear"]:
            for mix in MIX.names():
                ids.add(make(mixer={"blend": blend, "fw": fw, "mix": mix}).short_id())
    assert len(ids) == 3 * 4 * 4


# ------------------------------------------------------------------------------ registries
def test_registries_by_kind():
    assert REGISTRIES == {"kv": KV, "fw": FW, "blend": BLEND, "mix": MIX}


def test_registry_register_resolve_and_duplicates():
    from dataclasses import dataclass

    reg = Registry("thing")

    @dataclass(frozen=True)
    class Opts:
        size: int = 3

    @reg.register("alpha", config=Opts, short=lambda c: f"a{c.size}")
    class Alpha:
        pass

    entry, opts = reg.resolve({"name": "alpha", "size": 5}, "x.thing")
    assert entry.impl is Alpha and opts == Opts(5) and entry.short(opts) == "a5"
    assert reg.resolve("alpha", "x.thing")[1] == Opts(3)
    with pytest.raises(ConfigError) as info:
        reg.resolve({"name": "alpha", "size": "big"}, "x.thing")
    assert info.value.path == "x.thing.size"
    with pytest.raises(ConfigError, match=r"x\.thing: unknown thing 'alpah'; allowed: alpha \(did you mean 'alpha'\?\)"):
        reg.resolve("alpah", "x.thing")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("alpha", short="b")(object)


# ------------------------------------------------------------------------------ package exports
def run_py(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_validation_imports_without_torch():
    assert run_py("import sys; import hqlt.blocks.validation; from hqlt.blocks import ConfigError; "
                  "print('torch' in sys.modules)") == "False"


def test_model_config_export_is_the_function_whatever_the_import_order():
    """The function `model_config` lives in `model_schema`, so no submodule of the same name can shadow it."""
    code = ("{first}\nfrom hqlt.blocks import model_config\n"
            "print(model_config({{'vocab_size': 4, 'layers': 'F'}}).short_id())")
    for first in ("", "import hqlt.blocks.mixer", "import hqlt.blocks.model_schema as m; m.ModelConfig"):
        assert run_py(code.format(first=first)) == "dn2"


def test_configs_pickle_and_deepcopy():
    """Registry entries (whose short ids are often lambdas) pickle by (kind, name), so checked configs —
    and models holding them — can be pickled, e.g. by torch.save(model) or a process pool."""
    import copy
    import pickle

    cfg = make(layers="HKF", n_layers=3, mixer={"fw": "gated_delta", "mix": "dynamic_scalar", "blend": "delayed_chunk"})
    for clone in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg)):
        assert clone.short_id() == cfg.short_id() == "HKF_C64-gdn2-ds_SWA64_gdn2"
        assert clone.pattern == "HKF"
        for kind in ("kv", "fw", "blend", "mix"):
            assert clone.mixer.part(kind)[0] is cfg.mixer.part(kind)[0]  # the registered entry itself
            assert clone.mixer.part(kind)[1] == cfg.mixer.part(kind)[1]
