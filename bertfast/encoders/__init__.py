"""Packed-token encoders for transformers' families whose module tree is not BERT's.

BERT, RoBERTa, XLM-R and CamemBERT share BERT's tree and run on ``bertfast.modules``. DistilBERT,
ELECTRA, ALBERT, MPNet and ModernBERT name their submodules otherwise (and add a projection, a shared
layer group, a relative-position bias, or pre-norm layers with rotary embeddings and a sliding window),
so each has a module here with the same shape of API (``bertfast.dropin.FAMILIES`` names it):

* optionally ``unsupported(config)``: why a config cannot run exactly (named in the drop-in's
  refusal), or None; and ``fallback(arguments)``: why a call must run transformers' forward, or None;
* ``embed(base, packed, training)``: packed inputs -> the first layer's input, (T, hidden);
* ``layers(base)``: the encoder layer modules in the order they run (ALBERT's shared ones repeat);
* optionally ``packed_layer(layer, hidden, packing, rows, training)``: one layer on packed tokens, which
  the layer class's ``forward`` runs when the packed encoder calls the layer as a module (without it,
  the family's layers are BERT's: ``bertfast.modules.packed_layer``);
* ``packed_forward(base, arguments)``: the base model's forward, with transformers' output class.

Every function reads transformers' own submodules, and everything but the dense matmuls goes
through ``bertfast.ops`` (``bertfast.encoders.common``).
"""
