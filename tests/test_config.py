"""Config: layering, validation messages, --help, and every shipped config file."""

import json
from pathlib import Path

import pytest

from phi3_lora.config import DEMO_RECIPE, ConfigError, all_keys, help_text, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_embedded_demo():
    cfg = load_config()
    assert cfg.model.name_or_path == "tiny-random-phi3"
    assert cfg.training.learning_rate == DEMO_RECIPE["training"]["learning_rate"]
    assert cfg.output_dir == "outputs/demo"


def test_overrides_are_typed_and_win(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  max_steps: 5\n  learning_rate: 3e-4\nlora:\n  r: 4\n")
    cfg = load_config(recipe, ["lora.r=8", "training.num_epochs=2", "lora.target_modules=[qkv_proj,o_proj]",
                               "output_dir=/tmp/x"])
    assert (cfg.training.max_steps, cfg.training.learning_rate, cfg.lora.r) == (5, 3e-4, 8)
    assert cfg.training.num_epochs == 2.0 and isinstance(cfg.training.num_epochs, float)
    assert cfg.lora.target_modules == ["qkv_proj", "o_proj"]
    assert cfg.output_dir == "/tmp/x"


def test_no_is_a_string_and_only_true_and_false_are_booleans(tmp_path):
    """YAML 1.2's booleans: YAML 1.1 (PyYAML's default) reads no/yes/on/off as booleans, which made the
    documented ``training.mixed_precision: no`` an error, in a recipe and on the command line."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  mixed_precision: no\n  gradient_checkpointing: true\n")
    assert load_config(recipe).training.mixed_precision == "no"
    cfg = load_config(None, ["training.mixed_precision=no", "data.packing=True", "training.compile=false"])
    assert (cfg.training.mixed_precision, cfg.data.packing, cfg.training.compile) == ("no", True, False)
    with pytest.raises(ConfigError, match="data.packing: expected true or false, got 'yes'"):
        load_config(None, ["data.packing=yes"])


@pytest.mark.parametrize("override, message", [
    ("training.learning_rat=1e-4", "unknown key 'training.learning_rat' (command line) (did you mean "
                                   "'training.learning_rate'?)"),
    ("lora.rank=8", "unknown key 'lora.rank'"),
    ("learning_rate=1e-4", "did you mean 'training.learning_rate'?"),
    ("training.learning_rate=-1", "training.learning_rate: must be greater than 0, got -1.0"),
    ("training.max_steps=ten", "training.max_steps: expected an integer, got 'ten'"),
    ("training.gradient_checkpointing=maybe", "training.gradient_checkpointing: expected true or false"),
    ("training.lr_scheduler=exp", "training.lr_scheduler: 'exp' is not one of linear, cosine, constant"),
    ("lora.dropout=1.5", "lora.dropout: must be in [0, 1), got 1.5"),
    ("training.adam_beta1=1.5", "training.adam_beta1: must be in [0, 1), got 1.5"),
    ("training.seed=-1", "training.seed: must be in [0, 2**32), got -1"),
    ("training.preemption_signals=[SIGKILL]", "training.preemption_signals: SIGKILL cannot be caught"),
    ("training.preemption_signals=[SIG_DFL]", "training.preemption_signals: unknown signal 'SIG_DFL'"),
    ("training.max_steps", "expected KEY=VALUE"),
    ("training.max_grad_norm=nan", "training.max_grad_norm: expected a finite number, got nan"),
    ("training.num_epochs=.inf", "training.num_epochs: expected a finite number, got inf"),
    ("lora.alpha=-inf", "lora.alpha: expected a finite number, got -inf"),
])
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_text_settings_keep_their_text(tmp_path):
    """YAML reads 1.10 as 1.1 and 0123 as 83: a revision tag would silently name another. On the command line a
    text setting takes the text as typed; in a recipe an unquoted number or date is an error asking for quotes.
    An empty, null or ~ override unsets an optional one; a section with every entry commented out is empty."""
    cfg = load_config(None, ["model.revision=1.10", "data.split=1:30", "output_dir=2024-06-01",
                             "model.tokenizer=null", "data.eval_path=", "data.eval_split='0123'"])
    assert (cfg.model.revision, cfg.data.split, cfg.output_dir) == ("1.10", "1:30", "2024-06-01")
    assert cfg.data.eval_split == "0123"  # quoted as in YAML: the text inside
    assert cfg.model.tokenizer is None and cfg.data.eval_path is None
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  revision: 0123\n")
    with pytest.raises(ConfigError, match=r"^model.revision: expected text, got the int 83 \(YAML reads unquoted "
                                          r"numbers and dates as such: 1.10 becomes 1.1, 0123 becomes 83\); quote it$"):
        load_config(recipe)
    recipe.write_text("model:\n  revision: '0123'\nlora:\n#  r: 8\ntraining:\n  max_steps: 3\n")
    cfg = load_config(recipe)
    assert (cfg.model.revision, cfg.lora.r, cfg.training.max_steps) == ("0123", 16, 3)
    (tmp_path / "saved.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("text, message", [
    ("training: 5\n", r"^'training' \(.*r.yaml\) is a section: give its keys \(training.KEY=VALUE, or a mapping under "
                      r"'training:' in YAML\), not the int 5$"),
    ("training:\n  optimizer:\n    name: adamw\n",
     r"^training.optimizer: expected text, got the dict \{'name': 'adamw'\}$"),  # no hint about quoting numbers
    ("training:\n  max_steps: 5\n  max_steps: 7\n",
     r"^.*r.yaml line 3: not valid YAML \('max_steps' is given twice\)$"),
    ("training:\n  max_steps: 5\ntraining:\n  seed: 1\n", r"^.*r.yaml line 3: not valid YAML \('training' is given "
                                                         r"twice\)$"),
])
def test_misshapen_recipes_get_errors_that_say_what_is_wrong(tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(recipe)


def test_a_recipe_that_is_not_text_is_one_line(tmp_path):
    """A recipe of other bytes than UTF-8, an empty one and a directory are named, not a traceback or defaults."""
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"training:\n  max_steps: \xff\n")
    with pytest.raises(ConfigError, match=r"^.*r.yaml: not UTF-8 text \(invalid start byte at byte 23\)$"):
        load_config(recipe)
    recipe.write_text("  \n")
    with pytest.raises(ConfigError, match=r"^.*r.yaml: empty config file$"):
        load_config(recipe)
    with pytest.raises(ConfigError, match=r"^.*: a directory, not a config file$"):
        load_config(tmp_path)


def test_yaml_merge_keys_still_merge_and_an_unhashable_key_is_one_line(tmp_path):
    from phi3_lora.config import read_yaml
    recipe = tmp_path / "r.yaml"
    recipe.write_text("shared: &common\n  max_steps: 3\n  seed: 5\ntraining:\n  <<: *common\n  seed: 7\n")
    assert read_yaml(recipe)["training"] == {"max_steps": 3, "seed": 7}
    recipe.write_text("training:\n  [a]: 1\n")
    with pytest.raises(ConfigError, match=r"r.yaml line 2: not valid YAML \(found unhashable key\)$"):
        read_yaml(recipe)


def test_a_section_given_a_value_on_the_command_line_is_named():
    with pytest.raises(ConfigError, match=r"^'lora' \(command line\) is a section: give its keys"):
        load_config(None, ["lora=8"])


def test_overrides_may_come_on_both_sides_of_config(tmp_path):
    """scripts/slurm/job.sh passes its training.resume_from=auto before the user's --config and overrides."""
    from phi3_lora.cli import config_from_args, config_parser
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lora:\n  r: 4\n")
    args = config_parser("t").parse_args(["training.resume_from=auto", "--config", str(recipe), "lora.alpha=8"])
    cfg = config_from_args(args)
    assert (cfg.training.resume_from, cfg.lora.r, cfg.lora.alpha) == ("auto", 4, 8.0)


@pytest.mark.parametrize("backend", ["peft", "loralib"])
def test_lm_head_is_refused_as_a_target_before_anything_loads(backend):
    with pytest.raises(ConfigError, match=r"lora.target_modules: lm_head is not adapted here"):
        load_config(None, [f"lora.backend={backend}", "lora.target_modules=[qkv_proj,lm_head]"])


@pytest.mark.parametrize("backend", ["peft", "loralib"])
def test_targets_that_match_no_module_are_an_error_not_skipped(backend):
    """Phi-3 fuses q/k/v into qkv_proj: the Llama names would match nothing, and peft would silently adapt
    only the names that do match."""
    from phi3_lora.lora import attach_lora
    from phi3_lora.model import load_model, load_tokenizer
    cfg = load_config(None, [f"lora.backend={backend}", "lora.target_modules=[qkv_proj,q_proj,k_proj]"])
    model = load_model(cfg.model, load_tokenizer(cfg.model))
    with pytest.raises(ConfigError, match=r"^lora.target_modules: q_proj, k_proj match no module of this model") \
            as err:
        attach_lora(model, cfg.lora, seed=0)
    assert all(name in str(err.value) for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))


def test_targets_may_be_suffixes_of_module_names_as_in_peft():
    """peft matches a target against the whole module name or a suffix after a dot: one layer's down_proj, or
    self_attn.qkv_proj, adapts exactly those modules (the check used to compare last names only and refused)."""
    from phi3_lora.lora import attach_lora
    from phi3_lora.model import load_model, load_tokenizer
    cfg = load_config(None, ["lora.target_modules=[self_attn.qkv_proj,layers.1.mlp.down_proj]"])
    model = attach_lora(load_model(cfg.model, load_tokenizer(cfg.model)), cfg.lora, seed=0)
    adapted = sorted(n.split(".lora_A")[0].replace("base_model.model.model.", "")
                     for n, _ in model.named_parameters() if ".lora_A." in n)
    layers = cfg.model.tiny_layers
    assert adapted == sorted([f"layers.{i}.self_attn.qkv_proj" for i in range(layers)] + ["layers.1.mlp.down_proj"])
    cfg = load_config(None, ["lora.target_modules=[layers.9.mlp.down_proj]"])
    with pytest.raises(ConfigError, match=r"^lora.target_modules: layers.9.mlp.down_proj match no module"):
        attach_lora(load_model(cfg.model, load_tokenizer(cfg.model)), cfg.lora, seed=0)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("training:\n  warmup_step: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'training.warmup_step' \(.*bad.yaml\) \(did you mean "
                                          r"'training.warmup_steps'\?\)"):
        load_config(recipe)


@pytest.mark.parametrize("recipe, suggestion", [
    ("peft_config:\n  r: 8\n", "unknown key 'peft_config' (REC) (did you mean the section 'lora'?)"),  # the cookbook's
    ("training_config:\n  num_train_epochs: 1\n", "unknown key 'training_config' (REC) (did you mean the section "
                                                  "'training'?)"),
    ("Trainig:\n  max_steps: 3\n", "unknown key 'Trainig' (REC) (did you mean the section 'training'?)"),
    ("training:\n  num_train_epochs: 1\n", "unknown key 'training.num_train_epochs' (REC) (did you mean "
                                           "'training.num_epochs'?)"),
    ("training:\n  output_dir: x\n", "unknown key 'training.output_dir' (REC) (did you mean 'output_dir'?)"),
    ("training:\n  bf16: true\n", "unknown key 'training.bf16' (REC) (did you mean 'training.mixed_precision'?)"),
    ("lora:\n  lora_alpha: 32\n", "unknown key 'lora.lora_alpha' (REC) (did you mean 'lora.alpha'?)"),
    ("training:\n  max_seq_len: 512\n", "unknown key 'training.max_seq_len' (REC) (did you mean 'data.max_seq_len'?)"),
])
def test_other_tools_names_and_misplaced_keys_point_at_ours(tmp_path, recipe, suggestion):
    """A recipe ported from the cookbook's training_config and peft_config (TrainingArguments' and LoraConfig's
    names), a misspelt section, or a key in the wrong section: the error names the key that holds the setting."""
    path = tmp_path / "rec.yaml"
    path.write_text(recipe)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == suggestion.replace("REC", str(path))


def test_help_lists_every_key_with_default():
    text = help_text()
    for key, f in all_keys().items():
        assert f"  {key} = " in text, key
        assert f.metadata["help"] in text
    # where a run without --config (the embedded demo) differs from the default, --help says so
    assert "  output_dir = 'outputs/run' (demo: 'outputs/demo')\n" in text
    assert "  training.learning_rate = 0.0002 (demo: 0.001)\n" in text
    assert "  lora.r = 16\n" in text  # the demo's own r is the default: nothing added


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["lora.r=4", "training.seed=7"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_validates(path):
    cfg = load_config(path)
    assert cfg.output_dir


@pytest.mark.parametrize("path", sorted((ROOT / "accelerate_configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_accelerate_config_is_valid(path):
    from accelerate.commands.config.config_args import load_config_from_file
    launch = load_config_from_file(str(path))
    # accelerate launch sets CUDA_VISIBLE_DEVICES to gpu_ids unless it is "all": a fixed id would override the
    # GPUs a scheduler (SLURM) or the user gave the job
    assert launch.gpu_ids in (None, "all"), f"{path.name}: gpu_ids {launch.gpu_ids!r}"
    ds_file = (launch.deepspeed_config or {}).get("deepspeed_config_file")
    if ds_file:
        assert (ROOT / ds_file).is_file(), f"{path.name} points at missing {ds_file}"


@pytest.mark.parametrize("path", sorted((ROOT / "ds_configs").rglob("*.json")), ids=lambda p: p.name)
def test_every_deepspeed_config_leaves_training_settings_to_the_recipe(path):
    ds = json.loads(path.read_text())
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto", f"{path.name}: {key} must be 'auto' (the training config owns it)"
    assert "optimizer" not in ds and "scheduler" not in ds, "the training loop owns the optimizer and schedule"
    assert ds["bf16"]["enabled"] == "auto"


@pytest.mark.parametrize("has_package, capability, expected", [
    (True, (9, 0), "flash_attention_2"), (True, (8, 0), "flash_attention_2"),
    (True, (7, 5), "sdpa"), (False, (9, 0), "sdpa")])
def test_flash_attention_falls_back_to_sdpa_where_it_cannot_run(monkeypatch, caplog, has_package, capability, expected):
    """flash-attn needs its package and an Ampere or newer GPU (a T4 is 7.5); elsewhere sdpa, with a message.
    The GPU and the package are stood in for (this machine has neither)."""
    import importlib.util

    import torch

    from phi3_lora import model as model_lib
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: (
        (object() if has_package else None) if name == "flash_attn" else real_find_spec(name, *args)))
    assert model_lib.resolve_attention("flash_attention_2") == expected
    assert ("Ampere or newer GPU; using sdpa instead" in caplog.text) == (expected == "sdpa")
    assert model_lib.resolve_attention("sdpa") == "sdpa" and model_lib.resolve_attention("eager") == "eager"
