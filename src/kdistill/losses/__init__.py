"""Distillation losses: one family per file, a pure function beside each module.

* ``logits.py``: KD (Hinton et al. 2015), DKD, DIST, logit-standardised KD, reverse KL,
  Jensen-Shannon;
* ``features.py``: FitNets hints, attention transfer (AT), NST, VID, factor transfer (FT);
* ``hidden.py``: hidden-state distillation for language models (TinyBERT-style layer
  mapping, learned projections, padding masked out);
* ``relations.py``: SP, RKD (distance + angle), PKT, CC;
* ``contrastive.py``: CRD with its memory bank;
* ``tokens.py``: token-level losses for language models, chunked over positions: forward
  and reverse KL, GKD's generalized JSD, DistiLLM's skew KL, total variation.

Built-in names (in YAML: ``{name: dkd}`` or ``{name: DKDLoss}``) resolve through this
module's exports; your own loss is any :class:`DistillationLoss` subclass.
"""

from .base import DistillationLoss, WeightedSum
from .contrastive import CRDLoss, EmbedHead, crd_loss, nce_loss
from .features import (
    ATLoss,
    FTLoss,
    HintLoss,
    NSTLoss,
    Paraphraser,
    VIDLoss,
    at_loss,
    attention_map,
    ft_loss,
    hint_loss,
    nst_loss,
    vid_loss,
)
from .hidden import (
    HiddenStateLoss,
    decoder_layer_paths,
    hidden_state_loss,
    hidden_state_losses,
    hidden_state_mask,
    layer_mapping,
)
from .logits import (
    DISTLoss,
    DKDLoss,
    JSDivergenceLoss,
    KDLoss,
    KLDivergence,
    LogitStandardKDLoss,
    ReverseKLLoss,
    SoftTargetLoss,
    check_divergence,
    dist_loss,
    dkd_loss,
    js_divergence_loss,
    kd_loss,
    kl_divergence,
    ls_kd_loss,
    reverse_kl_loss,
    standardize_logits,
)
from .relations import (
    CCLoss,
    PKTLoss,
    RKDLoss,
    SPLoss,
    cc_loss,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
    sp_loss,
)
from .tokens import (
    GeneralizedJSDLoss,
    SkewKLLoss,
    SkewReverseKLLoss,
    TokenKLLoss,
    TotalVariationLoss,
    generalized_jsd_loss,
    skew_kl_loss,
    token_kl_loss,
    total_variation_loss,
)

__all__ = [
    "ATLoss",
    "CCLoss",
    "CRDLoss",
    "DISTLoss",
    "DKDLoss",
    "DistillationLoss",
    "EmbedHead",
    "FTLoss",
    "GeneralizedJSDLoss",
    "HiddenStateLoss",
    "HintLoss",
    "JSDivergenceLoss",
    "KDLoss",
    "KLDivergence",
    "LogitStandardKDLoss",
    "NSTLoss",
    "PKTLoss",
    "Paraphraser",
    "RKDLoss",
    "ReverseKLLoss",
    "SPLoss",
    "SkewKLLoss",
    "SkewReverseKLLoss",
    "SoftTargetLoss",
    "TokenKLLoss",
    "TotalVariationLoss",
    "VIDLoss",
    "WeightedSum",
    "at_loss",
    "attention_map",
    "cc_loss",
    "check_divergence",
    "crd_loss",
    "decoder_layer_paths",
    "dist_loss",
    "dkd_loss",
    "ft_loss",
    "generalized_jsd_loss",
    "hidden_state_loss",
    "hidden_state_losses",
    "hidden_state_mask",
    "hint_loss",
    "js_divergence_loss",
    "kd_loss",
    "kl_divergence",
    "layer_mapping",
    "ls_kd_loss",
    "nce_loss",
    "nst_loss",
    "pkt_loss",
    "reverse_kl_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
    "skew_kl_loss",
    "sp_loss",
    "standardize_logits",
    "token_kl_loss",
    "total_variation_loss",
    "vid_loss",
]
