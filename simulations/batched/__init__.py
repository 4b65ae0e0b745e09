"""The batched engine (``pft simulate --engine batched``): many subjects' translators adapted at once.

The per-client engine adapts one subject after another with
:class:`~pft.core.adaptation.AdaptationTrainer` and :class:`~pft.core.adaptation.PFTAdaptation`.
This engine runs the SAME objective (:class:`pft.core.objective.PFTObjective`, evaluated with a
subject axis) over the SAME sampled batches for a chunk of subjects at a time. Its modules, one
job each:

- :mod:`~pft.simulations.batched.engine` - the chunk loop: chunks read from the tasks, one step
  (draws, forward, objective, one autograd pass, optimiser), per-subject stopping by the
  trainer's rule (:class:`pft.core.adaptation.Convergence`), compaction;
- :mod:`~pft.simulations.batched.streams` - the random streams (``exact``: the trainer's draws
  replayed bit for bit; ``fast``: one block of words per subject and step), spread over threads;
- :mod:`~pft.simulations.batched.forward` - the stacked forward through T's own interface
  (:meth:`~pft.core.models.Translator.stacked_forward`,
  :meth:`~pft.core.models.Translator.frozen_prefix`): the general autograd road and the bias-only
  fast road, which falls back to the general one (with a warning) when the objective needs an
  output it does not give;
- :mod:`~pft.simulations.batched.optimiser` - the trainer's Adam/SGD on the stacked tensors;
- :mod:`~pft.simulations.batched.chunk`, :mod:`~pft.simulations.batched.tasks`,
  :mod:`~pft.simulations.batched.buffers` - a chunk's state, the per-subject inputs and outputs,
  the reused step buffers.

Agreement with the per-client engine: the sampled batches, masks and noise are identical
(``rng="exact"``); the arithmetic differs only by float re-association and rounding (``bmm`` vs
``mm``, a fused vs an unfused LayerNorm, the folded dropout scale, the bias added after C), ~1e-6
relative on the loss. Per-subject iterations, parameters (``atol 1e-4``) and predictions agree; a
subject whose EMA criterion sits within ~1e-6 of the threshold could stop one step apart (tests
check a few subjects). Memory is bounded by ``chunk_size`` subjects, not by their number: chunks
are produced one at a time and the caller consumes each before the next.
"""

from pft.simulations.batched.engine import BatchedConfig, adapt_subjects, run_pft_batched, trainable_names
from pft.simulations.batched.forward import FastPathUnavailable
from pft.simulations.batched.streams import RandomStreams
from pft.simulations.batched.tasks import SubjectAdaptation, SubjectTask, subject_task

__all__ = [
    "BatchedConfig",
    "FastPathUnavailable",
    "RandomStreams",
    "SubjectAdaptation",
    "SubjectTask",
    "adapt_subjects",
    "run_pft_batched",
    "subject_task",
    "trainable_names",
]
