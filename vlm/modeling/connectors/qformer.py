"""The BLIP-2 Querying Transformer (Q-Former) as a connector: ``qformer``.

A BERT-style post-LayerNorm transformer over two kinds of positions: ``num_queries`` learned
query embeddings, and (for the stage-1 objectives and retrieval) text tokens. Every
``cross_attention_freq``-th layer (0, f, 2f, ...) lets the query positions cross-attend to the
image features; queries and text share the self-attention but have separate feed-forward
networks. Which positions see which is the caller's attention mask (see
``vlm/training/objectives/qformer_stage1.py`` for the three masks of stage 1).

As a connector it turns ``(B, N, vision_dim)`` image features into ``num_queries`` visual tokens:
the query outputs, projected to the LLM width by one linear layer (BLIP-2's
``language_projection``). The module also holds the stage-1 heads (ITC projections and
temperature, ITM head, ITG language-model head) so that any later checkpoint can still be
evaluated on retrieval; the LLM path never uses them. With ``options.separate_retrieval`` it also
holds a frozen copy of itself as stage 1 left it (:class:`QFormerRetrievalCopy`), which answers
retrieval once a later stage trains the Q-Former through the LLM, as BLIP-2 keeps its stage-1
Q-Former for retrieval.

The text path has its own tokenizer (``options.text_tokenizer``, else the LLM's) and its own
word embeddings: the tokenizer's rows plus two appended rows for ``[CLS]`` (ITC / ITM) and
``[DEC]`` (ITG), which need not exist in the tokenizer. ``options.init_from_bert`` loads a local
transformers ``BertModel`` checkpoint into the embeddings, the self-attention layers and both
feed-forward paths (as LAVIS does); the cross-attention layers start random.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vlm.config import ConfigError
from vlm.modeling.connectors.base import BuildContext, Connector
from vlm.modeling.connectors.image_text import ImageTextMatcher

OPTIONS_KEY = "model.connector.options"
# BERT-base, the Q-Former of BLIP-2, for every size not given and not read from a checkpoint
BERT_BASE = dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072, max_text_positions=512)


@dataclass
class QFormerOptions:
    """Options of the ``qformer`` connector (``model.connector.options``).

    Sizes left null are BERT-base's, or the checkpoint's with ``init_from_bert``.
    ``text_specials``: each text is framed by the text tokenizer's own special tokens (its
    post-processor, truncated to ``max_text_tokens`` its own way), as an imported InstructBLIP's
    ``qformer_tokenizer`` writes them, instead of vlm's ``[CLS]`` row and end token.
    """

    num_queries: int = 32
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    max_text_positions: Optional[int] = None
    cross_attention_freq: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    vision_layernorm: bool = True
    image_positions: Optional[int] = None
    embed_dim: int = 256
    max_text_tokens: int = 32
    init_from_bert: Optional[str] = None
    text_tokenizer: Optional[str] = None
    instruction_aware: bool = False
    separate_retrieval: bool = False
    text_specials: bool = False


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, L, S)`` booleans (True = may attend) -> ``(B, 1, L, S)`` additive float mask."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


class QFormerAttention(nn.Module):
    """Multi-head attention with BERT's output block: dense, dropout, residual, LayerNorm."""

    def __init__(self, hidden_size: int, num_heads: int, context_dim: int, dropout: float,
                 attention_dropout: float, eps: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ConfigError(f"{OPTIONS_KEY}.num_heads: hidden_size {hidden_size} is not a multiple of "
                              f"num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(context_dim, hidden_size)
        self.value = nn.Linear(context_dim, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.attention_dropout = attention_dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b n (h d) -> b h n d", h=self.num_heads)

    def forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Self-attention over ``hidden`` (``context`` None) or cross-attention to ``context``;
        ``mask`` is additive, broadcastable to ``(B, heads, L, S)``."""
        source = hidden if context is None else context
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(source)), self._heads(self.value(source))
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attention_dropout if self.training else 0.0)
        attended = rearrange(attended, "b h n d -> b n (h d)")
        return self.norm(self.dropout(self.out(attended)) + hidden)


class QFormerFeedForward(nn.Module):
    """BERT's intermediate + output block: up, GELU, down, dropout, residual, LayerNorm."""

    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float, eps: float):
        super().__init__()
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.down = nn.Linear(intermediate_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dropout(self.down(F.gelu(self.up(hidden)))) + hidden)


class QFormerLayer(nn.Module):
    """Self-attention over queries and text; cross-attention of the queries to the image (in
    some layers); a feed-forward network for the queries and another for the text."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, vision_dim: int,
                 cross_attention: bool, dropout: float, attention_dropout: float, eps: float):
        super().__init__()
        attention = dict(dropout=dropout, attention_dropout=attention_dropout, eps=eps)
        self.self_attn = QFormerAttention(hidden_size, num_heads, hidden_size, **attention)
        self.cross_attn = QFormerAttention(hidden_size, num_heads, vision_dim, **attention) if cross_attention else None
        self.query_ffn = QFormerFeedForward(hidden_size, intermediate_size, dropout, eps)
        self.text_ffn = QFormerFeedForward(hidden_size, intermediate_size, dropout, eps)

    def forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor], image: Optional[torch.Tensor],
                num_queries: int) -> torch.Tensor:
        hidden = self.self_attn(hidden, mask)
        queries, text = hidden[:, :num_queries], hidden[:, num_queries:]
        parts = []
        if num_queries:
            if self.cross_attn is not None:
                queries = self.cross_attn(queries, context=image)
            parts.append(self.query_ffn(queries))
        if text.shape[1]:
            parts.append(self.text_ffn(text))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class QFormerLMHead(nn.Module):
    """BERT's MLM head for ITG: dense, GELU, LayerNorm, then a decoder tied to the word
    embeddings plus its own bias."""

    def __init__(self, word_embeddings: nn.Embedding, eps: float):
        super().__init__()
        hidden_size = word_embeddings.embedding_dim
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.word_embeddings = [word_embeddings]  # a list: tied, not a second registered copy
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(F.gelu(self.dense(hidden)))
        return F.linear(hidden, self.word_embeddings[0].weight, self.bias)


def _add_trunk(module: nn.Module, vision_dim: int, vocab: int, sizes: dict, opts: QFormerOptions) -> None:
    """Register the transformer on ``module``: queries, image-feature norm and positions, text
    embeddings (``vocab`` rows, ``[CLS]`` and ``[DEC]`` included) and the layers."""
    hidden = sizes["hidden_size"]
    module.num_queries = opts.num_queries
    module.query_tokens = nn.Parameter(torch.empty(1, opts.num_queries, hidden))
    module.vision_norm = nn.LayerNorm(vision_dim) if opts.vision_layernorm else nn.Identity()
    # a learned embedding per image feature position, for encoders whose features do not carry
    # where they are (BLIP-2's ViTs do, and have none)
    module.image_position_embeddings = (nn.Parameter(torch.empty(1, opts.image_positions, vision_dim))
                                        if opts.image_positions else None)
    module.word_embeddings = nn.Embedding(vocab, hidden)
    module.position_embeddings = nn.Embedding(sizes["max_text_positions"], hidden)
    module.embedding_norm = nn.LayerNorm(hidden, eps=opts.layer_norm_eps)
    module.embedding_dropout = nn.Dropout(opts.dropout)
    module.layers = nn.ModuleList(
        QFormerLayer(hidden, sizes["num_heads"], sizes["intermediate_size"], vision_dim,
                     cross_attention=i % opts.cross_attention_freq == 0, dropout=opts.dropout,
                     attention_dropout=opts.attention_dropout, eps=opts.layer_norm_eps)
        for i in range(sizes["num_layers"])
    )


def _add_matching_heads(module: nn.Module, hidden: int, opts: QFormerOptions) -> None:
    """Register the retrieval heads on ``module``: the ITC projections and the ITM head (the ITC
    temperature ``temp`` is registered by the caller, after them)."""
    module.vision_proj = nn.Linear(hidden, opts.embed_dim)
    module.text_proj = nn.Linear(hidden, opts.embed_dim)
    module.itm_head = nn.Linear(hidden, 2)


def _embed(trunk: nn.Module, batch_size: int, input_ids: Optional[torch.Tensor], with_queries: bool) -> torch.Tensor:
    """``[queries; word + position embeddings of the text]`` of ``trunk``, LayerNorm, dropout."""
    parts = []
    if with_queries:
        parts.append(trunk.query_tokens.expand(batch_size, -1, -1))
    if input_ids is not None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        parts.append(trunk.word_embeddings(input_ids) + trunk.position_embeddings(positions))
    hidden = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return trunk.embedding_dropout(trunk.embedding_norm(hidden))


def _encode(trunk: nn.Module, image_features: Optional[torch.Tensor], input_ids: Optional[torch.Tensor],
            text_mask: Optional[torch.Tensor], attention: Optional[torch.Tensor]) -> torch.Tensor:
    """:meth:`QFormer.encode` through the transformer registered on ``trunk`` by :func:`_add_trunk`."""
    if image_features is None and input_ids is None:
        raise ValueError("encode() needs image features, text, or both")
    batch = (image_features if image_features is not None else input_ids).shape[0]
    num_queries = trunk.num_queries if image_features is not None else 0
    hidden = _embed(trunk, batch, input_ids, with_queries=num_queries > 0)
    image = None
    if image_features is not None:
        image = trunk.vision_norm(image_features.to(trunk.query_tokens.dtype))
        if trunk.image_position_embeddings is not None:
            if image.shape[1] != trunk.image_position_embeddings.shape[1]:
                raise ValueError(f"{OPTIONS_KEY}.image_positions is {trunk.image_position_embeddings.shape[1]} "
                                 f"but the encoder gives {image.shape[1]} features per image")
            image = image + trunk.image_position_embeddings
    if attention is None:
        keys = torch.ones(batch, hidden.shape[1], dtype=torch.bool, device=hidden.device)
        if text_mask is not None:
            keys[:, num_queries:] = text_mask.bool()
        attention = keys.unsqueeze(1).expand(-1, hidden.shape[1], -1)
    elif attention.shape[-1] != hidden.shape[1]:
        raise ValueError(f"attention mask covers {attention.shape[-1]} positions, the input has {hidden.shape[1]}")
    mask = additive_mask(attention, hidden.dtype)
    for layer in trunk.layers:
        hidden = layer(hidden, mask, image, num_queries)
    return hidden


class QFormerRetrievalCopy(nn.Module):
    """A frozen copy of the Q-Former's transformer and retrieval heads (same parameter names) as
    stage 1 left them (``options.separate_retrieval``). ``kept`` (saved with the weights) says
    whether it holds that copy; until then retrieval reads the Q-Former itself."""

    def __init__(self, vision_dim: int, vocab: int, sizes: dict, opts: QFormerOptions):
        super().__init__()
        _add_trunk(self, vision_dim, vocab, sizes, opts)
        _add_matching_heads(self, sizes["hidden_size"], opts)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.register_buffer("kept", torch.tensor(False))

    def encode(self, image_features: Optional[torch.Tensor] = None, input_ids: Optional[torch.Tensor] = None,
               text_mask: Optional[torch.Tensor] = None, attention: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`QFormer.encode` with the copied weights."""
        return _encode(self, image_features, input_ids, text_mask, attention)

    @torch.no_grad()
    def keep(self, qformer: nn.Module) -> None:
        """Copy ``qformer``'s weights of the same names, and hold them (``kept``)."""
        own = dict(qformer.named_parameters())
        for name, param in self.named_parameters():
            param.copy_(own[name])
        self.kept.fill_(True)


def _resolve_sizes(opts: QFormerOptions, bert_config) -> dict:
    """Layer sizes: the options', else the checkpoint's (with ``init_from_bert``), else BERT-base's.
    A size given in the options that contradicts the checkpoint is a ConfigError."""
    from_bert = {}
    if bert_config is not None:
        from_bert = dict(num_layers=bert_config.num_hidden_layers, hidden_size=bert_config.hidden_size,
                         num_heads=bert_config.num_attention_heads,
                         intermediate_size=bert_config.intermediate_size,
                         max_text_positions=bert_config.max_position_embeddings)
    sizes = {}
    for key, default in BERT_BASE.items():
        given = getattr(opts, key)
        if given is not None and key in from_bert:
            # fewer layers / positions than the checkpoint: its first ones are used
            at_most = key in ("num_layers", "max_text_positions")
            if (given > from_bert[key]) if at_most else (given != from_bert[key]):
                need = f"at most {from_bert[key]}" if at_most else str(from_bert[key])
                raise ConfigError(f"{OPTIONS_KEY}.{key}: {given} does not fit the checkpoint in init_from_bert "
                                  f"(must be {need}); leave it null to use the checkpoint's")
        sizes[key] = given if given is not None else from_bert.get(key, default)
    return sizes


class QFormer(Connector, ImageTextMatcher):
    """BLIP-2's Q-Former: learned queries that cross-attend to image features, a BERT text path,
    and the stage-1 heads. As a connector: ``num_queries`` visual tokens of the LLM's width."""

    Options = QFormerOptions

    def __init__(self, vision_dim: int, llm_dim: int, text_tokenizer, opts: QFormerOptions, bert=None):
        super().__init__()
        sizes = _resolve_sizes(opts, bert.config if bert is not None else None)
        hidden = sizes["hidden_size"]
        self.opts = opts
        self.max_text_tokens = opts.max_text_tokens
        self.instruction_aware = opts.instruction_aware
        self.text_tokenizer = text_tokenizer
        vocab = len(text_tokenizer)
        self.cls_token_id, self.dec_token_id = vocab, vocab + 1
        # the tokenizer's own end-of-text token closes every text (BERT: [SEP]; a causal LM's: eos)
        self.end_token_id = text_tokenizer.sep_token_id if text_tokenizer.sep_token_id is not None \
            else text_tokenizer.eos_token_id
        pad = text_tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else 0

        _add_trunk(self, vision_dim, vocab + 2, sizes, opts)
        # stage-1 heads
        _add_matching_heads(self, hidden, opts)
        self.lm_head = QFormerLMHead(self.word_embeddings, opts.layer_norm_eps)
        self.temp = nn.Parameter(torch.tensor(0.07))
        # the bridge to the LLM
        self.proj = nn.Linear(hidden, llm_dim)
        self.retrieval = None
        self.apply(self._init_weights)
        nn.init.normal_(self.query_tokens, std=0.02)
        if self.image_position_embeddings is not None:
            # unit scale, as the normalised features they are added to: at BERT's 0.02 the
            # queries take hundreds of steps longer to tell positions apart
            nn.init.normal_(self.image_position_embeddings, std=1.0)
        if bert is not None:
            self._load_bert(bert)
        if opts.separate_retrieval:
            # built without drawing from the global generator, so that everything else starts,
            # and trains, exactly as without it; equal from the start, held once a stage says so
            with torch.random.fork_rng(devices=[]):
                self.retrieval = QFormerRetrievalCopy(vision_dim, vocab + 2, sizes, opts)
            self.retrieval.keep(self)
            self.retrieval.kept.fill_(False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    def check_options(cls, options: dict, where: str) -> None:
        opts = QFormerOptions(**options)
        if opts.num_queries < 1:
            raise ConfigError(f"{where}.num_queries: must be at least 1, got {opts.num_queries}")
        if opts.cross_attention_freq < 1:
            raise ConfigError(f"{where}.cross_attention_freq: must be at least 1, got {opts.cross_attention_freq}")
        if opts.init_from_bert and not opts.text_tokenizer:
            raise ConfigError(f"{where}.text_tokenizer: init_from_bert needs the checkpoint's own tokenizer "
                              "(usually the same folder); the LLM's tokenizer does not match its word embeddings")

    @classmethod
    def from_config(cls, options: dict, ctx: BuildContext) -> "QFormer":
        """Build from ``model.connector.options``; ``ctx.tokenizer`` (the LLM's) is the text
        tokenizer unless ``options.text_tokenizer`` names another one."""
        tokenizer = ctx.tokenizer
        cls.check_options(dict(options), OPTIONS_KEY)
        opts = QFormerOptions(**options)
        if opts.text_tokenizer:
            from transformers import AutoTokenizer

            text_tokenizer = AutoTokenizer.from_pretrained(opts.text_tokenizer)
        elif tokenizer is None:
            raise ValueError("the qformer connector needs a text tokenizer: pass the LLM's tokenizer or set "
                             f"{OPTIONS_KEY}.text_tokenizer")
        else:
            text_tokenizer = tokenizer
        bert = None
        if opts.init_from_bert:
            from transformers import BertModel

            bert = BertModel.from_pretrained(opts.init_from_bert, add_pooling_layer=False)
        return cls(ctx.vision_dim, ctx.llm_dim, text_tokenizer, opts, bert)

    def num_tokens(self, num_patches: int) -> int:
        return self.num_queries

    # ----------------------------------------------------------------------------------------
    # the transformer

    def embed(self, batch_size: int, input_ids: Optional[torch.Tensor], with_queries: bool) -> torch.Tensor:
        """``[queries; word + position embeddings of the text]``, LayerNorm, dropout."""
        return _embed(self, batch_size, input_ids, with_queries)

    def encode(self, image_features: Optional[torch.Tensor] = None, input_ids: Optional[torch.Tensor] = None,
               text_mask: Optional[torch.Tensor] = None, attention: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden states ``(B, Q + T, H)`` of the queries (when ``image_features`` are given) followed
        by the text (when ``input_ids`` are given).

        ``attention`` is a boolean ``(B, Q + T, Q + T)`` mask (True = may attend), e.g. one of
        the stage-1 masks; None lets every position see every non-padding position
        (``text_mask`` marks the text's real tokens).
        """
        return _encode(self, image_features, input_ids, text_mask, attention)

    def query_outputs(self, image_features: torch.Tensor) -> torch.Tensor:
        """The queries' last hidden states ``(B, Q, H)``, queries alone with the image."""
        return self.encode(image_features=image_features)

    def forward(self, features: torch.Tensor, instructions: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Visual tokens ``(B, Q, llm_dim)``: the query outputs through the LLM projection.

        Instruction-aware (InstructBLIP, ``options.instruction_aware``): each image's instruction
        text enters the Q-Former beside the queries, with full attention between them, so what
        the queries extract depends on what is asked; ``instructions`` gives one per image.
        """
        if not self.instruction_aware:
            return self.proj(self.query_outputs(features))
        if instructions is None or len(instructions) != features.shape[0]:
            got = "none" if instructions is None else len(instructions)
            raise ValueError(f"an instruction-aware qformer needs one instruction per image: {features.shape[0]} "
                             f"image(s), {got} instruction(s)")
        ids, mask = self.tokenize_texts(instructions, device=features.device)
        return self.proj(self.encode(features, ids, mask)[:, : self.num_queries])

    def encode_images(self, vision: nn.Module, pixel_values: torch.Tensor,
                      instructions: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Images -> visual tokens, through the encoder's features (and the instructions)."""
        return self(vision(pixel_values), instructions)

    def own_tokenizer(self):
        """The text tokenizer when ``options.text_tokenizer`` names one (not the LLM's)."""
        return self.text_tokenizer if self.opts.text_tokenizer else None

    def llm_unused_parameters(self) -> List[nn.Parameter]:
        """The stage-1 heads, the retrieval copy and, unless instruction-aware, the text path:
        nothing the LLM path reads."""
        modules = [self.vision_norm, self.embedding_norm, self.proj]
        for layer in self.layers:
            modules += [m for m in (layer.self_attn, layer.cross_attn, layer.query_ffn) if m is not None]
            if self.instruction_aware:
                modules.append(layer.text_ffn)
        if self.instruction_aware:
            modules += [self.word_embeddings, self.position_embeddings]
        used = {id(self.query_tokens), id(self.image_position_embeddings)}
        used |= {id(p) for m in modules for p in m.parameters()}
        return [p for p in self.parameters() if id(p) not in used]

    def stage1_unused_parameters(self) -> List[nn.Parameter]:
        """The LLM projection and the retrieval copy: the stage-1 objectives never read them."""
        copy = list(self.retrieval.parameters()) if self.retrieval is not None else []
        return list(self.proj.parameters()) + copy

    def begin_stage(self, trains_matching: bool) -> None:
        """With ``separate_retrieval``: a stage that trains the Q-Former through anything but the
        image-text objectives keeps the Q-Former as it is now (stage 1's) for retrieval, once; a
        stage-1 stage hands retrieval back to the Q-Former it trains."""
        if self.retrieval is None:
            return
        if trains_matching:
            self.retrieval.kept.fill_(False)
        elif not bool(self.retrieval.kept):
            self.retrieval.keep(self)

    # ----------------------------------------------------------------------------------------
    # the text path and the stage-1 heads (ImageTextMatcher)

    def tokenize_texts(self, texts: Sequence[str], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[CLS] text [end]`` ids (at most ``max_text_tokens``; with ``text_specials`` the
        tokenizer's own framing), right-padded: ``(ids, mask)``. Replace column 0 by
        ``dec_token_id`` for ITG."""
        rows = []
        end = [self.end_token_id] if self.end_token_id is not None else []
        for text in texts:
            if self.opts.text_specials:
                rows.append(self.text_tokenizer(text, truncation=True, max_length=self.max_text_tokens)["input_ids"])
                continue
            ids = self.text_tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append(([self.cls_token_id] + ids)[: self.max_text_tokens - len(end)] + end)
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids.to(device), mask.to(device)

    def matching(self) -> nn.Module:
        """What retrieval reads: the kept stage-1 copy (``separate_retrieval``, once a later stage
        has begun), else the Q-Former itself."""
        return self.retrieval if self.retrieval is not None and bool(self.retrieval.kept) else self

    def image_embeddings(self, image_features: torch.Tensor) -> torch.Tensor:
        """ITC image side: normalised projected query outputs ``(B, Q, embed_dim)``."""
        matching = self.matching()
        return F.normalize(matching.vision_proj(matching.encode(image_features=image_features)), dim=-1)

    def text_embeddings(self, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """ITC text side: the normalised projected ``[CLS]`` output of the text alone ``(B, embed_dim)``."""
        matching = self.matching()
        hidden = matching.encode(input_ids=input_ids, text_mask=text_mask)
        return F.normalize(matching.text_proj(hidden[:, 0]), dim=-1)

    def match_logits(self, image_features: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor,
                     attention: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ITM: ``(B, 2)`` logits (no match, match) of a joint query + text pass, averaged over the
        query outputs. ``attention`` defaults to full (bidirectional) attention over both."""
        matching = self.matching()
        hidden = matching.encode(image_features, input_ids, text_mask, attention)
        return matching.itm_head(hidden[:, : self.num_queries]).mean(dim=1)

    def retrieval_temperature(self) -> float:
        """The ITC temperature of the heads retrieval reads (:meth:`matching`), within the bounds
        of :meth:`temperature`."""
        return float(self.matching().temp.detach().clamp(0.01, 0.5))

    def temperature(self) -> torch.Tensor:
        """The ITC temperature, kept in [0.01, 0.5]: LAVIS's upper bound, and CLIP's lower one
        (logit scale at most 100); LAVIS's 0.001 lets a fast learning rate blow the logits up.

        The parameter itself is clamped, in place and outside autograd (as LAVIS does), so that
        its gradient stays alive: a clamp in the graph would give it gradient 0 past a bound,
        where it could never come back from."""
        with torch.no_grad():
            self.temp.clamp_(0.01, 0.5)
        return self.temp

    # ----------------------------------------------------------------------------------------
    # initialisation from a BERT checkpoint

    @torch.no_grad()
    def _load_bert(self, bert) -> None:
        """Copy a transformers ``BertModel`` into the text embeddings, self-attention and both
        feed-forward paths of the first ``len(self.layers)`` layers.

        BERT adds a token-type embedding (type 0 for every token) that the Q-Former does not
        have; it is folded into the position embeddings, so the text path reproduces BertModel's
        hidden states exactly. Queries take no position embedding, as in BLIP-2.
        """
        emb = bert.embeddings
        words = emb.word_embeddings.weight
        if len(self.text_tokenizer) < words.shape[0]:
            raise ConfigError(f"{OPTIONS_KEY}.text_tokenizer: {len(self.text_tokenizer)} tokens, but the "
                              f"checkpoint in init_from_bert has {words.shape[0]} word embeddings")
        self.word_embeddings.weight[: words.shape[0]] = words
        cls_id = self.text_tokenizer.cls_token_id
        if cls_id is not None:  # start [CLS] where the checkpoint's own [CLS] is
            self.word_embeddings.weight[self.cls_token_id] = words[cls_id]
        positions = emb.position_embeddings.weight[: self.position_embeddings.num_embeddings]
        self.position_embeddings.weight.copy_(positions + emb.token_type_embeddings.weight[0])
        self.embedding_norm.load_state_dict(emb.LayerNorm.state_dict())
        for ours, theirs in zip(self.layers, bert.encoder.layer):
            attention = theirs.attention
            for name in ("query", "key", "value"):
                getattr(ours.self_attn, name).load_state_dict(getattr(attention.self, name).state_dict())
            ours.self_attn.out.load_state_dict(attention.output.dense.state_dict())
            ours.self_attn.norm.load_state_dict(attention.output.LayerNorm.state_dict())
            for ffn in (ours.text_ffn, ours.query_ffn):
                ffn.up.load_state_dict(theirs.intermediate.dense.state_dict())
                ffn.down.load_state_dict(theirs.output.dense.state_dict())
                ffn.norm.load_state_dict(theirs.output.LayerNorm.state_dict())
