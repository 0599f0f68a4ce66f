"""Every implementation of a seam conforms to its protocol in `core.seams`: the methods the trainer
and `build_trainer` call exist with the protocol's parameters in the protocol's order (extra ones
optional), and the instances that can be built here pass the runtime protocol check."""
import inspect

import pytest
import torch

from tessera.alignment.dpo import DPOTask
from tessera.alignment.reward import RewardTask
from tessera.alignment.rl_task import RLTask, RLUpdate
from tessera.alignment.sft import SFTTask
from tessera.core import seams
from tessera.core.checkpoint import Checkpointer
from tessera.core.config import ModelConfig, load_config
from tessera.core.data import StreamingLoader
from tessera.core.data.samples import SampleLoader
from tessera.core.engine import LocalEngine
from tessera.core.metrics import MetricsLogger, NullMetrics
from tessera.core.model import Transformer
from tessera.core.placement import LocalPlacement
from tessera.core.task import LanguageModelingTask
from tessera.distributed.checkpoint import ShardedCheckpointer
from tessera.distributed.deepspeed_engine import DeepSpeedCheckpointer, DeepSpeedEngine, DeepSpeedPlacement
from tessera.distributed.engine import DistributedEngine
from tessera.distributed.placement import ParallelPlacement, placement_for
from tessera.multimodal.clip_task import CLIPTask
from tessera.multimodal.image_loader import ImageTextLoader
from tessera.multimodal.vlm_task import VLMTask

IMPLEMENTATIONS = {
    seams.Placement: [LocalPlacement, ParallelPlacement, DeepSpeedPlacement],
    seams.Engine: [LocalEngine, DistributedEngine, DeepSpeedEngine],
    seams.CheckpointStore: [Checkpointer, ShardedCheckpointer, DeepSpeedCheckpointer],
    seams.MetricsWriter: [MetricsLogger, NullMetrics],
    seams.BatchLoader: [StreamingLoader, SampleLoader, ImageTextLoader],
    seams.Task: [LanguageModelingTask, SFTTask, RewardTask, DPOTask, RLTask, CLIPTask, VLMTask],
    seams.Update: [RLUpdate],
}


def protocol_methods(protocol) -> dict:
    return {name: member for name, member in vars(protocol).items()
            if callable(member) and (not name.startswith("_") or name in ("__call__", "__iter__"))}


def parameters(fn) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("protocol, cls", [(p, c) for p, impls in IMPLEMENTATIONS.items() for c in impls],
                         ids=lambda x: x.__name__)
def test_every_implementation_has_the_protocol_methods_with_their_parameters(protocol, cls):
    for name, member in protocol_methods(protocol).items():
        assert hasattr(cls, name), f"{cls.__name__} lacks {protocol.__name__}.{name}"
        wanted, got = parameters(member), parameters(getattr(cls, name))
        assert [p.name for p in got[:len(wanted)]] == [p.name for p in wanted], \
            f"{cls.__name__}.{name}{inspect.signature(getattr(cls, name))} differs from the protocol's"
        assert all(p.default is not inspect.Parameter.empty or p.kind is p.VAR_KEYWORD for p in got[len(wanted):]), \
            f"{cls.__name__}.{name} adds required parameters"


def test_a_protocol_check_fails_for_a_non_conforming_class():
    """The conformance test above can fail: a checkpointer without companions does not conform."""

    class OldCheckpointer(Checkpointer):
        def save(self, step, engine, state, run_config=""):
            return super().save(step, engine, state, run_config)

    save = parameters(protocol_methods(seams.CheckpointStore)["save"])
    assert [p.name for p in parameters(OldCheckpointer.save)] != [p.name for p in save]


def test_the_instances_built_here_pass_the_runtime_protocol_check(prepared, tmp_path, one_thread):
    cfg = load_config(None, [f"--data.path={str(prepared.root)!r}", "--train.device='cpu'",
                             f"--train.run_dir={str(tmp_path)!r}", "--log.tensorboard=false"])
    model = Transformer(ModelConfig(vocab_size=prepared.vocab_size, n_layers=1, d_model=32, n_heads=2))
    optimizer = torch.optim.AdamW(model.parameters())
    device = torch.device("cpu")
    task = LanguageModelingTask(cfg)
    train, _ = task.loaders(cfg, 0, 1)
    instances = {
        seams.Placement: [LocalPlacement(device), placement_for(cfg)],
        seams.Engine: [LocalEngine(model, optimizer, device), DistributedEngine(model, optimizer, device)],
        seams.CheckpointStore: [Checkpointer(tmp_path / "a"), ShardedCheckpointer(tmp_path / "b"),
                                DeepSpeedCheckpointer(tmp_path / "c")],
        seams.MetricsWriter: [MetricsLogger(tmp_path, tensorboard=False), NullMetrics()],
        seams.BatchLoader: [train, SampleLoader(list(range(8)), list, 2, 0, 1)],
        seams.Task: [task],
    }
    for protocol, objects in instances.items():
        for obj in objects:
            assert isinstance(obj, protocol), f"{type(obj).__name__} is not a {protocol.__name__}"
    assert not isinstance(object(), seams.Engine)
