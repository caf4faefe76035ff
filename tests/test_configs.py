"""Every option of every config group composes and instantiates (lightning-hydra-template style)."""

import pytest
from hydra.utils import instantiate

from conftest import CONF, ESSAY, compose

GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if g.is_dir()}
OPTIONS = [(g, o) for g, opts in sorted(GROUPS.items()) for o in opts]


def test_contract_groups_exist():
    for g in ("data", "model", "optim", "masking", "trainer", "logger"):
        assert GROUPS.get(g), f"config group {g} missing"
    assert {"bert_tiny", "bert_mini", "bert_small", "bert_base", "pretrained"} <= set(GROUPS["model"])
    assert {f"modernbert_{size}" for size in ("tiny", "mini", "small", "base")} <= set(GROUPS["model"])
    assert {"token", "whole_word", "span", "ngram"} <= set(GROUPS["masking"])
    cfg = compose()
    assert "seed" in cfg and cfg.masking.ratio == 0.4 and cfg.trainer.resume == "auto"


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    import torch

    extra = []
    if (group, option) == ("data", "text_file"):
        extra = [f"data.path={ESSAY}"]
    if (group, option) == ("data", "hf_dataset"):
        extra = ["data.name=text", f"data.data_files={ESSAY}"]  # datasets' text builder: a record per line
    if (group, option) == ("model", "pretrained"):
        from transformers import BertConfig, BertForPreTraining, BertTokenizerFast

        from bertexp.data.tokenizer import SPECIAL_TOKENS

        (tmp_path / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS + list("我们的是在")) + "\n")
        BertTokenizerFast.from_pretrained(str(tmp_path)).save_pretrained(str(tmp_path))
        BertForPreTraining(BertConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32)).save_pretrained(str(tmp_path))
        extra = [f"model.path={tmp_path}"]
    cfg = compose([f"{group}={option}", *extra])
    if group == "data":
        assert instantiate(cfg.data).max_length == cfg.data.max_length
    elif group == "model":
        spec = instantiate(cfg.model)
        assert spec.max_positions >= 128
        if option != "pretrained":
            _builds_its_family_at_bert_size(option, spec, tmp_path)
    elif group == "masking":
        m = instantiate(cfg.masking)
        assert m.ratio == cfg.masking.ratio
    elif group == "optim":
        from bertexp.optim import build_optimizer

        opt = build_optimizer(cfg.optim, torch.nn.Linear(3, 3))
        assert opt.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr)
        assert opt.param_groups[1]["weight_decay"] == 0.0  # biases never decay
    elif group == "trainer":
        assert cfg.trainer.max_steps >= 1
    elif group == "logger":
        assert cfg.logger is None or cfg.logger.mode in ("offline", "online")
    elif group == "task":
        from bertexp.finetune import check_task

        check_task(cfg.task)
        assert cfg.task.name == option and cfg.task.seeds >= 1


def _builds_its_family_at_bert_size(option: str, spec, tmp_path) -> None:
    """A scratch model option builds (on the meta device: no memory, no init) the model its keys describe; a
    ModernBERT option has its BERT twin's width, depth and heads, and a GLU MLP of its parameters within 1%."""
    import torch
    from transformers import BertTokenizerFast

    from bertexp.data.tokenizer import SPECIAL_TOKENS

    (tmp_path / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS + list("我们的是在")) + "\n")
    tok = BertTokenizerFast.from_pretrained(str(tmp_path))
    with torch.device("meta"):
        net = spec.build(tok)
    fields = {k: v for k, v in spec.config.items() if k != "reference_compile"}
    assert {k: getattr(net.config, k) for k in fields} == fields and net.config.model_type == spec.family.model_type
    if option.startswith("modernbert_"):
        twin = instantiate(compose([f"model={option.replace('modernbert_', 'bert_')}"]).model)
        shape = ("hidden_size", "num_hidden_layers", "num_attention_heads")
        assert {k: spec.config[k] for k in shape} == {k: twin.config[k] for k in shape}
        with torch.device("meta"):
            bert = twin.build(tok)
        glu = sum(m.weight.numel() for layer in net.model.layers for m in (layer.mlp.Wi, layer.mlp.Wo))
        mlp = sum(m.dense.weight.numel() for layer in bert.bert.encoder.layer for m in (layer.intermediate, layer.output))
        assert abs(glu - mlp) <= 0.01 * mlp, (glu, mlp)


def test_slurm_preset_composes_with_requeue_settings():
    """SLURM cannot run here: its preset is checked by composing it (the requeue hook has its own test)."""
    cfg = compose(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4"],
                  return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.tasks_per_node == 4  # one task per GPU
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0  # requeue, with time to checkpoint
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    known = set(SlurmQueueConf.__dataclass_fields__)
    assert set(launcher) <= known, set(launcher) - known  # every key is one the plugin understands


def test_help_and_config_comments_list_exactly_the_options():
    """`python run.py --help` (conf/hydra/help/bertexp.yaml) and the comments of conf/config.yaml's defaults
    name every option of every group and nothing else: the schemas are no options."""
    import re

    from omegaconf import OmegaConf

    real = {g: set(opts) for g, opts in GROUPS.items() if g != "hydra"}
    template = OmegaConf.to_container(OmegaConf.load(CONF / "hydra" / "help" / "bertexp.yaml"))["template"]
    listed = dict(re.findall(r"^  (\w+) +(.+)$", template.split("Groups (")[1].split("\n\n")[0], re.M))
    assert set(listed) == set(real)
    for group, options in listed.items():
        named = {o.strip() for o in options.split("|") if not o.strip().startswith("(")}
        assert named == real[group], group
    comments = dict(re.findall(r"^  - (\w+): \w+ +# ([^:]+?)(?::|$)", (CONF / "config.yaml").read_text(), re.M))
    for group, options in comments.items():
        named = {re.sub(r"\s*\(.*", "", o).strip() for o in options.split("|")} - {"null"}
        assert named == real[group], (group, named)


@pytest.mark.parametrize("options", [[], ["data=text_file", "masking=span", "task=sentiment", "model=modernbert_tiny"]])
def test_help_describes_every_field(options):
    """`python run.py --help` shows the composed config with each field's description beside it, from the
    comments in conf/ (or the schema's in bertexp/schema.py where an option's file has none)."""
    import re
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(CONF.parent / "run.py"), "--help", *options], capture_output=True, text=True,
                       timeout=120, cwd=CONF.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    config = r.stdout.split("each field with what it means")[1]
    fields = re.findall(r"^(\w+:|  \w+:)(.*)$", config, re.M)
    assert len(fields) > 60
    bare = [f"{k}{v}" for k, v in fields if " # " not in v and not v.strip() == ""]
    assert not bare, bare  # every field (nested values such as optim.optimizer's aside) says what it is
    assert re.search(r"^  ratio: 0.4 +# share of non-special tokens selected, in \(0, 1\)", config, re.M)
    assert re.search(r"^  tags: \[\] +# your own W&B tags", config, re.M)
    assert re.search(r"^seed: 42 +# seeds data order", config, re.M)
    if options:  # inherited fields: text_file's from peoples_daily, span's from token, and the schema's
        assert re.search(r"^  batch_size: 32 +# pairs per optimizer step", config, re.M)
        assert re.search(r"^  p: 0.2 +# geometric parameter of span lengths", config, re.M)
        assert re.search(r"^  mask_token_prob: 0.8 +# of the selected: share replaced by \[MASK\]", config, re.M)
        assert re.search(r"^  seeds: 3 +# fine-tuning seeds", config, re.M)
