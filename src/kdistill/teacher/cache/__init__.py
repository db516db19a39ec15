"""Offline teacher outputs: run the teacher once, distil from the stored outputs.

:meth:`TeacherCache.build` runs a teacher over a dataset in order and stores what it
produced (full logits, or the top-k logits and the mass of the other classes, plus any
tapped layers) as memory-mapped ``.npy`` files; :meth:`TeacherCache.open` maps them back
as a teacher, which a :class:`~kdistill.Distiller` uses like a live one: it looks each
sample's outputs up by ``batch.index``, so no teacher forward runs during distillation.

The package is split by job: :mod:`.format` (what the bytes mean: encoding, fingerprints,
the manifest), :mod:`.build` (running the teacher and writing durably) and :mod:`.serve`
(:class:`TeacherCache`, the teacher protocol over the stored rows).

Layout of a cache directory::

    path/
      manifest.json        what was built, from what, and a checksum of every file
      logits.npy           mode="full": (N, C) in `dtype` (or (N, T, V) for sequences)
      topk_values.npy      mode="topk": (N, k) the k largest logits, in `dtype`, descending
      topk_indices.npy     mode="topk": (N, k) their classes, int16 (C <= 32767) or int32
      tail.npy             mode="topk": (N,) float32, log-sum-exp of the other C - k logits
      tail_at.npy          mode="topk" with tail_temperatures=(T1, ...): (N, m) float32,
                           log(sum exp(z / Tj)) over the same C - k logits, one column per Tj
      feature.<layer>.npy  one per tapped layer: (N, *shape) in `dtype`
      view_seeds.npy       with views=V: (V, N) int64, the seed of sample i's view v

With ``views=V`` every output array has ``V * N`` rows: row ``v * N + i`` holds the
teacher's outputs for view ``v`` of sample ``i``.

**The top-k tail.** ``tail[i] = log(sum_{c not in top-k} exp(z_ic))`` at ``T = 1``, so the
teacher's probability mass outside the top k is ``exp(tail - logsumexp([topk_values,
tail]))`` and nothing of the ``T = 1`` distribution is lost but how the tail mass is split
between the other classes. The cache rebuilds ``(B, C)`` logits with the k
stored logits in place and every other class set to ``tail - log(C - k)``: the value
``C - k`` equal logits need to carry the same total mass. At ``T = 1`` the softmax of the
rebuilt logits is therefore exact for the top-k classes and for the total tail mass (up to
float rounding), with the tail spread uniformly (the maximum-entropy choice). At another
temperature the ratios between the top-k probabilities stay exact (they depend only on
the stored logits), but the tail mass is approximate: ``(C - k) * mean(a)^(1/T)`` stands
for ``sum(a^(1/T))`` with ``a = exp(z_tail)``; by Jensen's inequality the rebuilt tail is
*at least* the true one for ``T > 1`` (the top-k probabilities come out low) and
at most for ``T < 1``, and exact when the tail logits are equal. It is a proper
distribution at every temperature (softmax of finite logits). The filled value never
exceeds the k-th stored logit, so the top-k classes stay the top k.

The error at ``T > 1`` is not small when the tail holds real mass
(``benchmarks/cache_accuracy.py`` measures it). A build with ``tail_temperatures=(4.0,)``
also stores ``log(sum exp(z_tail / 4))`` (4 bytes per sample per temperature); a cache
told ``T = 4`` by :meth:`TeacherCache.set_temperatures` (the Distiller passes its losses'
temperatures at ``compile``) then fills the tail with ``4 * (tail_at - log(C - k))``, which
makes the softmax at ``T = 4`` exact for the top-k classes and the tail mass. A
temperature the build did not store is refused there, before training.

**Augmentation views.** A cache of the un-augmented samples cannot serve a student that
trains on augmented inputs: the teacher's outputs would be for other inputs. A build with
``views=V, augment=aug`` stores ``V`` augmented views per sample instead: view ``v`` of
sample ``i`` is ``aug.seeded(x[i], view_seeds[v, i])`` (seeded augmentations draw from the
per-sample seed alone, see :mod:`kdistill.data.augment`), and the manifest records the
augmentation (``aug.to_config()``) and the seeds. In epoch ``e`` the Distiller trains on
view ``e mod V``: it rebuilds each batch's inputs from the stored seeds
(:meth:`TeacherCache.prepare`), so the student sees exactly the input the teacher
saw, in any batch order, after a resume, on any device. ``V`` epochs of views cost ``V``
teacher passes once; a longer run cycles through them (the student sees each view
``epochs / V`` times, where online distillation would draw a fresh one every epoch).

**Atomic and resumable.** See :mod:`.build`.
"""

from .build import COMMIT_INTERVAL_S, build_cache, estimate_size
from .format import (CacheError, CacheMismatchError, dataset_fingerprint, make_view_seeds, teacher_fingerprint,
                     topk_to_logits)
from .serve import TeacherCache

__all__ = ["COMMIT_INTERVAL_S", "CacheError", "CacheMismatchError", "TeacherCache", "build_cache",
           "dataset_fingerprint", "estimate_size", "make_view_seeds", "teacher_fingerprint", "topk_to_logits"]
