"""The Show-Attend-Tell decoder: an LSTM with soft (Bahdanau) attention over CNN annotation vectors (Xu et al., 2015).

At step ``t``, with previous word ``y_{t-1}``, state ``(h_{t-1}, c_{t-1})`` and annotation vectors ``a_1..a_L``:

* attention: ``e_ti = w·tanh(W_a a_i + W_h h_{t-1})``, ``α_t = softmax(e_t)``, ``z_t = Σ_i α_ti a_i``;
* gate: ``β_t = σ(f_β(h_{t-1}))`` (one scalar per step in the paper; one per feature channel here, as in the
  implementation Li et al. 2022 used), ``ẑ_t = β_t ⊙ z_t``;
* recurrence: ``(h_t, c_t) = LSTMCell([E y_{t-1}; ẑ_t], (h_{t-1}, c_{t-1}))``, started from
  ``h_0 = tanh(f_init_h(mean_i a_i))`` and ``c_0 = tanh(f_init_c(mean_i a_i))``;
* deep output: ``p(y_t) = softmax(L_o dropout(tanh(E y_{t-1} + L_h h_t + L_z ẑ_t)))``, or with ``deep_output=False``
  the shallow head ``softmax(L_o dropout(h_t))`` of the PyTorch implementation Li et al. 2022 trained.

The step is an explicit ``nn.LSTMCell`` loop: attention needs ``h_{t-1}`` at every step, and attacks differentiate
the model in eval mode, where cuDNN's fused ``nn.LSTM`` refuses to run backward.
"""

from __future__ import annotations

import torch
from torch import nn

LSTMState = tuple[torch.Tensor, torch.Tensor]


class SoftAttention(nn.Module):
    """Additive attention of the decoder state over the annotation vectors.

    Args:
        encoder_dim: Size ``D`` of an annotation vector.
        hidden_dim: Size ``H`` of the LSTM state.
        attention_dim: Size ``A`` of the joint attention space.
    """

    def __init__(self, encoder_dim: int, hidden_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.encoder_proj = nn.Linear(encoder_dim, attention_dim)
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """``W_a a_i``, which does not depend on the step: computed once per image.

        Shape:
            ``(B, L, D)`` in, ``(B, L, A)`` out.
        """
        return self.encoder_proj(features)

    def forward(
        self, features: torch.Tensor, projected: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context vector and attention weights for one step.

        Shape:
            ``features``: ``(B, L, D)``; ``projected``: ``(B, L, A)``; ``hidden``: ``(B, H)``;
            returns ``(B, D)`` and ``(B, L)``.
        """
        energy = self.score(torch.tanh(projected + self.hidden_proj(hidden).unsqueeze(1))).squeeze(2)
        alpha = energy.softmax(dim=1)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)
        return context, alpha


class AttentionLSTMDecoder(nn.Module):
    """Everything of Show-Attend-Tell after the encoder's annotation vectors.

    Args:
        vocab_size: Output vocabulary ``V``.
        encoder_dim: Size ``D`` of an annotation vector.
        embed_dim: Word embedding size ``E``.
        attention_dim: Joint attention space size ``A``.
        hidden_dim: LSTM state size ``H``.
        dropout: Dropout before the output layer.
        deep_output: Xu et al.'s deep output layer; ``False`` reads the words from ``h_t`` alone.
    """

    def __init__(
        self,
        vocab_size: int,
        encoder_dim: int,
        embed_dim: int,
        attention_dim: int,
        hidden_dim: int,
        dropout: float,
        deep_output: bool = True,
    ) -> None:
        super().__init__()
        self.deep_output = deep_output
        # Named "embedding" so CaptioningModule.configure_optimizers exempts it from weight decay.
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.attention = SoftAttention(encoder_dim, hidden_dim, attention_dim)
        self.init_h = nn.Linear(encoder_dim, hidden_dim)
        self.init_c = nn.Linear(encoder_dim, hidden_dim)
        self.f_beta = nn.Linear(hidden_dim, encoder_dim)
        self.lstm = nn.LSTMCell(embed_dim + encoder_dim, hidden_dim)
        if deep_output:
            self.out_hidden = nn.Linear(hidden_dim, embed_dim)
            self.out_context = nn.Linear(encoder_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(embed_dim if deep_output else hidden_dim, vocab_size)
        # The reference implementations' initialisation of the word embedding and the output layer.
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def init_state(self, features: torch.Tensor) -> LSTMState:
        """``(h_0, c_0)`` from the mean annotation vector.

        Shape:
            ``(B, L, D)`` in, two ``(B, H)`` out.
        """
        mean = features.mean(dim=1)
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))

    def recur(
        self, features: torch.Tensor, projected: torch.Tensor, embedded: torch.Tensor, state: LSTMState
    ) -> tuple[torch.Tensor, torch.Tensor, LSTMState]:
        """Attend, gate and advance the LSTM by one word.

        Shape:
            ``features``: ``(B, L, D)``; ``projected``: ``(B, L, A)``; ``embedded``: ``(B, E)``;
            returns the gated context ``(B, D)``, the attention ``(B, L)`` and the new state (two ``(B, H)``).
        """
        hidden, cell = state
        context, alpha = self.attention(features, projected, hidden)
        gated = torch.sigmoid(self.f_beta(hidden)) * context
        hidden, cell = self.lstm(torch.cat([embedded, gated], dim=-1), (hidden, cell))
        return gated, alpha, (hidden, cell)

    def output(self, embedded: torch.Tensor, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Next-word logits from the previous word, the new state and the gated context.

        Shape:
            ``(..., E)``, ``(..., H)`` and ``(..., D)`` in (any matching leading dims), ``(..., V)`` out.
        """
        if self.deep_output:
            hidden = torch.tanh(embedded + self.out_hidden(hidden) + self.out_context(context))
        return self.fc(self.dropout(hidden))

    def step(
        self, features: torch.Tensor, projected: torch.Tensor, tokens: torch.Tensor, state: LSTMState
    ) -> tuple[torch.Tensor, torch.Tensor, LSTMState]:
        """One decoding step from the previous words.

        Shape:
            ``features``: ``(B, L, D)``; ``projected``: ``(B, L, A)``; ``tokens``: ``(B,)``;
            returns logits ``(B, V)``, attention ``(B, L)`` and the new state.
        """
        embedded = self.embedding(tokens)
        context, alpha, state = self.recur(features, projected, embedded, state)
        return self.output(embedded, state[0], context), alpha, state

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits for a whole caption.

        Args:
            features: Annotation vectors. Shape: ``(B, L, D)``.
            input_ids: Start token then the previous words. Shape: ``(B, T)``.

        Returns:
            Logits ``(B, T, V)`` and attention weights ``(B, T, L)``.
        """
        projected = self.attention.project(features)
        state = self.init_state(features)
        embedded = self.embedding(input_ids)
        contexts, hiddens, alphas = [], [], []
        for t in range(input_ids.shape[1]):
            context, alpha, state = self.recur(features, projected, embedded[:, t], state)
            contexts.append(context)
            hiddens.append(state[0])
            alphas.append(alpha)
        # The output layer has no recurrence: one batched call for all steps instead of T small ones.
        logits = self.output(embedded, torch.stack(hiddens, dim=1), torch.stack(contexts, dim=1))
        return logits, torch.stack(alphas, dim=1)
