//! The Llama family in one file: Llama 2/3 (with `llama3` rope scaling), Mistral and
//! Qwen2/2.5 (q/k/v bias), chosen by config flags. Grouped-query attention, RoPE, RMSNorm,
//! SwiGLU, tied or untied embeddings.
//!
//! RMSNorm, rotary embedding, attention and SwiGLU are our fused ops (`crate::ops`), each
//! one autograd node with a hand-written backward pass, so a training step is not dominated
//! by candle's per-op gradient bookkeeping. We deliberately avoid candle's own fused `rope`,
//! `rms_norm` and `softmax_last_dim` kernels: they have no backward pass, so gradients
//! through them would silently be dropped.
//!
//! The residual stream is kept as (B*T, C) rows, the layout every linear layer and fused op
//! reads, so no reshapes or head transposes enter the graph.
//!
//! bf16 weights ([`Precision::Bf16`]): the forward pass sees every weight rounded to bf16,
//! through a differentiable cast, so gradients reach the f32 master weights unchanged and
//! the optimizer updates those; activations, norms, softmax and log-softmax stay in f32.
//!
//! Shapes: B batch, T time, C hidden, H query heads, KV key/value heads, D head dim, V vocab.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::lora::{LoraAdapter, LINEAR_MODULES};
use crate::ops::{self, AttentionMask, PackedSpan};
use crate::params::Params;

/// Every parameter the config implies, with its Hugging Face name and shape.
pub fn parameter_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (c, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let (h, kv, d) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![v, c])];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let mut add = |name: &str, shape: Vec<usize>| shapes.push((format!("{p}.{name}"), shape));
        add("input_layernorm.weight", vec![c]);
        add("self_attn.q_proj.weight", vec![h * d, c]);
        add("self_attn.k_proj.weight", vec![kv * d, c]);
        add("self_attn.v_proj.weight", vec![kv * d, c]);
        add("self_attn.o_proj.weight", vec![c, h * d]);
        if cfg.qkv_bias() {
            add("self_attn.q_proj.bias", vec![h * d]);
            add("self_attn.k_proj.bias", vec![kv * d]);
            add("self_attn.v_proj.bias", vec![kv * d]);
        }
        if cfg.o_bias() {
            add("self_attn.o_proj.bias", vec![c]);
        }
        add("post_attention_layernorm.weight", vec![c]);
        add("mlp.gate_proj.weight", vec![f, c]);
        add("mlp.up_proj.weight", vec![f, c]);
        add("mlp.down_proj.weight", vec![c, f]);
        if cfg.mlp_bias {
            add("mlp.gate_proj.bias", vec![f]);
            add("mlp.up_proj.bias", vec![f]);
            add("mlp.down_proj.bias", vec![c]);
        }
    }
    shapes.push(("model.norm.weight".to_string(), vec![c]));
    if !cfg.tie_word_embeddings {
        shapes.push(("lm_head.weight".to_string(), vec![v, c]));
    }
    shapes
}

/// What a network built over a model's parameters is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The network's tensors are the parameters' variables, so a backward pass reaches them.
    Train,
    /// Detached copies that record no graph, laid out for fast inference (scoring, sampling,
    /// reference models).
    Infer,
    /// Detached views of the parameters, no copy and no graph: a frozen base under trainable
    /// adapters, or a network that must not double a large model's memory.
    Frozen,
}

/// A LoRA adapter applied to a network: its weight in the sum of adapters (1 for a plain
/// adapter; APO's extrapolation coefficients in the online loop) and whether its matrices
/// are trained.
#[derive(Clone, Copy)]
pub struct AdapterUse<'a> {
    pub adapter: &'a LoraAdapter,
    pub coefficient: f64,
    pub trainable: bool,
}

/// The dropout masks of a training forward pass: row b of the batch is sequence
/// `sequences[b]` (a stable id, e.g. the example's index), and its masks are a pure function
/// of (`seed`, that id, the layer): the same for any batching or thread count, and the same
/// again when a checkpointed block is recomputed.
#[derive(Clone, Debug)]
pub struct Dropout {
    pub seed: u64,
    pub sequences: Vec<u64>,
}

/// Per-call state of a forward pass.
#[derive(Clone, Debug, Default)]
struct Ctx {
    dropout: Option<std::sync::Arc<Dropout>>,
}

/// The precision the network computes its weights in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// The f32 weights as they are.
    F32,
    /// Every weight rounded to bf16 (and back to f32) on the forward pass; see the module docs.
    Bf16,
}

impl Precision {
    /// `Bf16` when `bf16` (the `bf16` training key), else `F32`.
    pub fn from_bf16_flag(bf16: bool) -> Self {
        if bf16 {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }
}

/// `y = x W^T + b` over the last dimension, plus any LoRA terms.
struct Linear {
    weight_t: Tensor,     // (in, out): W^T, see `transposed`
    bias: Option<Tensor>, // (out,)
    /// Round the weights to bf16 on every forward pass (trainable bf16 models, whose
    /// weights change between passes).
    round: bool,
    lora: Vec<LoraTerm>,
}

/// One adapter's low-rank term of a linear layer: `+ scale * (dropout(x) A^T) B^T`.
#[derive(Clone)]
struct LoraTerm {
    a_t: Tensor, // (in, r)
    b_t: Tensor, // (r, out)
    /// The adapter's `lora_alpha / r` times its coefficient.
    scale: f64,
    /// Dropout probability on the term's input (training forward passes only).
    dropout: f64,
    /// The ChaCha stream of this term's dropout masks (by layer and module).
    stream: u64,
}

impl LoraTerm {
    /// The term for the fused layer ([`ops::lora_linear`]), with its dropout mask for x when
    /// this forward pass draws one.
    fn low_rank(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<ops::LowRank> {
        let mask = match &ctx.dropout {
            Some(d) if self.dropout > 0.0 => Some(self.mask(d, x.dims2()?, x.device())?),
            _ => None,
        };
        Ok(ops::LowRank { a_t: self.a_t.clone(), b_t: self.b_t.clone(), scale: self.scale, mask })
    }

    /// The inverted-dropout mask (rows, in) of x: 0 with probability `dropout`, else
    /// 1/(1 - dropout), drawn per sequence of the batch (see [`Dropout`]).
    fn mask(&self, d: &Dropout, (rows, cols): (usize, usize), device: &Device) -> candle_core::Result<Tensor> {
        let keep = 1.0 - self.dropout;
        let per_sequence = rows / d.sequences.len().max(1);
        let mut mask = Vec::with_capacity(rows * cols);
        for &sequence in &d.sequences {
            let mut rng = ChaCha8Rng::seed_from_u64(d.seed ^ sequence.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            rng.set_stream(self.stream);
            mask.extend(
                (0..per_sequence * cols).map(|_| if rng.gen::<f64>() < keep { (1.0 / keep) as f32 } else { 0.0 }),
            );
        }
        if mask.len() != rows * cols {
            candle_core::bail!("dropout: {} sequences for {rows} rows", d.sequences.len());
        }
        Tensor::from_vec(mask, (rows, cols), device)
    }

    fn detached(&self) -> Self {
        LoraTerm { a_t: self.a_t.detach(), b_t: self.b_t.detach(), ..self.clone() }
    }
}

/// `w` as the forward pass uses it: rounded to bf16 (and back to f32) when `round`. The
/// cast is differentiable: its gradient is the incoming one, in f32.
fn rounded(w: &Tensor, round: bool) -> candle_core::Result<Tensor> {
    if round {
        w.to_dtype(DType::BF16)?.to_dtype(w.dtype())
    } else {
        Ok(w.clone())
    }
}

/// W^T for a matmul. A view of W (`view`: a trainable model, so gradients reach it, or a
/// frozen one that must not copy); otherwise a contiguous copy, which the CPU matmul
/// multiplies 1.5-2x faster at small batch sizes (sampling's decode steps), at the cost of a
/// copy of the weights.
fn transposed(w: Tensor, view: bool) -> candle_core::Result<Tensor> {
    if view {
        w.t()
    } else {
        w.t()?.contiguous()
    }
}

impl Linear {
    /// The same layer over detached views of its tensors: it records no graph.
    fn detached(&self) -> Self {
        Linear {
            weight_t: self.weight_t.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
            round: self.round,
            lora: self.lora.iter().map(LoraTerm::detached).collect(),
        }
    }

    /// x (rows, in) -> (rows, out).
    fn forward(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let weight_t = rounded(&self.weight_t, self.round)?;
        let mut y = if self.lora.is_empty() {
            x.matmul(&weight_t)?
        } else {
            let terms: Vec<ops::LowRank> =
                self.lora.iter().map(|t| t.low_rank(x, ctx)).collect::<candle_core::Result<_>>()?;
            ops::lora_linear(x, &weight_t, &terms)?
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&rounded(b, self.round)?)?;
        }
        Ok(y)
    }
}

/// RMSNorm as in transformers: `w * x / sqrt(mean(x^2) + eps)`, computed in f32.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
    round: bool, // as Linear's
}

impl RmsNorm {
    fn detached(&self) -> Self {
        RmsNorm { weight: self.weight.detach(), eps: self.eps, round: self.round }
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::rms_norm(x, &rounded(&self.weight, self.round)?, self.eps)
    }
}

/// Rotary position embedding, transformers' "rotate half" layout.
pub struct Rope {
    inv_freq: Vec<f32>, // (D/2,)
}

impl Rope {
    fn new(cfg: &LlamaConfig) -> Result<Self> {
        let d = cfg.head_dim();
        let base = cfg.rope_theta as f32;
        // transformers computes base^(2i/d) in f32; do the same so angles agree bit for bit.
        let mut inv_freq: Vec<f32> = (0..d / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32)).collect();
        let scaling =
            cfg.llama3_rope_scaling().map_err(|message| ModelError::Config { path: "config.json".into(), message })?;
        if let Some(s) = scaling {
            // Llama 3.1: keep high frequencies, divide low ones by `factor`, and blend
            // smoothly in between (transformers' `_compute_llama3_parameters`).
            let old_len = s.original_max_position_embeddings as f32;
            let (factor, low, high) = (s.factor as f32, s.low_freq_factor as f32, s.high_freq_factor as f32);
            let low_freq_wavelen = old_len / low;
            let high_freq_wavelen = old_len / high;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                let scaled = if wavelen > low_freq_wavelen { *f / factor } else { *f };
                // transformers: ~(wavelen < high) & ~(wavelen > low); wavelen is finite and positive.
                let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                *f = if medium {
                    let smooth = (old_len / wavelen - low) / (high - low);
                    (1.0 - smooth) * scaled / factor + smooth * scaled
                } else {
                    scaled
                };
            }
        }
        Ok(Self { inv_freq })
    }

    /// cos and sin tables for positions `start..start+len`, each (T, D).
    pub fn tables(&self, start: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        self.tables_at(&(start..start + len).collect::<Vec<_>>(), device)
    }

    /// cos and sin tables for arbitrary positions, each (N, D) for N = `positions.len()`.
    pub fn tables_at(&self, positions: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut angles = Vec::with_capacity(positions.len() * half * 2);
        for &p in positions {
            let row: Vec<f32> = self.inv_freq.iter().map(|f| p as f32 * f).collect();
            angles.extend_from_slice(&row);
            angles.extend_from_slice(&row);
        }
        let angles = Tensor::from_vec(angles, (positions.len(), 2 * half), device)?;
        Ok((angles.cos()?, angles.sin()?))
    }
}

/// Keys/values of earlier positions, per layer.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
}

/// One layer's keys and values, (B, KV, capacity, D) each (each head's positions
/// contiguous, which decoding reads fastest), of which the first `len` positions are
/// filled. Without gradients, new positions are written in place and the capacity doubles
/// when full, so a decode step costs O(T) rather than O(past) copying;
/// with gradients (a trainable model), they are concatenated, so gradients reach every
/// position's projections.
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerKv {
    /// Appends k, v (B, KV, T, D); returns every cached position's keys and values,
    /// (B, KV, past+T, D) each (a view of the buffers when no gradient is tracked).
    fn append(slot: &mut Option<LayerKv>, k: Tensor, v: Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let len = slot.as_ref().map_or(0, |c| c.len);
        let new_len = len + k.dim(2)?;
        if k.track_op() || v.track_op() {
            let (k, v) = match slot.as_ref() {
                Some(c) => {
                    (Tensor::cat(&[&c.k.narrow(2, 0, len)?, &k], 2)?, Tensor::cat(&[&c.v.narrow(2, 0, len)?, &v], 2)?)
                }
                None => (k, v),
            };
            *slot = Some(LayerKv { k: k.clone(), v: v.clone(), len: new_len });
            return Ok((k, v));
        }
        let capacity = slot.as_ref().map_or(0, |c| c.k.dim(2).unwrap_or(0));
        if new_len > capacity {
            let (b, kv, _, d) = k.dims4()?;
            let capacity = new_len.max(2 * capacity).max(64);
            let grow = |old: Option<&Tensor>| -> candle_core::Result<Tensor> {
                let buf = Tensor::zeros((b, kv, capacity, d), k.dtype(), k.device())?;
                if let Some(old) = old {
                    buf.slice_set(old, 2, 0)?;
                }
                Ok(buf)
            };
            let (k_buf, v_buf) = (grow(slot.as_ref().map(|c| &c.k))?, grow(slot.as_ref().map(|c| &c.v))?);
            *slot = Some(LayerKv { k: k_buf, v: v_buf, len });
        }
        let Some(c) = slot.as_mut() else { unreachable!("allocated above") };
        c.k.slice_set(&k.contiguous()?, 2, len)?;
        c.v.slice_set(&v.contiguous()?, 2, len)?;
        c.len = new_len;
        Ok((c.k.narrow(2, 0, new_len)?, c.v.narrow(2, 0, new_len)?))
    }
}

impl KvCache {
    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some(c)) => c.len,
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the batch rows `rows` (indices into dim 0, repeats allowed), in that
    /// order: drops finished sequences, or copies a prompt's cache to several samples.
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        let Some(Some(c)) = self.layers.first() else { return Ok(()) };
        let rows = Tensor::new(rows, c.k.device())?;
        for c in self.layers.iter_mut().flatten() {
            c.k = c.k.index_select(&rows, 0)?;
            c.v = c.v.index_select(&rows, 0)?;
        }
        Ok(())
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
}

impl Attention {
    /// x (B*T, C) at positions past..past+T (see `mask`); `cache` holds the earlier
    /// keys/values. cos, sin: rotary tables, (T, D) or one row per input row.
    fn forward(
        &self,
        x: &Tensor,
        batch: usize,
        (cos, sin): (&Tensor, &Tensor),
        mask: &AttentionMask,
        cache: Option<&mut Option<LayerKv>>,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        let q = ops::rope(&self.q.forward(x, ctx)?, cos, sin)?; // (B*T, H*D)
        let k = ops::rope(&self.k.forward(x, ctx)?, cos, sin)?; // (B*T, KV*D)
        let v = self.v.forward(x, ctx)?; // (B*T, KV*D)
        let (k, v) = match cache {
            Some(slot) => {
                let t = x.dim(0)? / batch;
                let heads = |y: Tensor| y.reshape((batch, t, self.kv_heads, ()))?.transpose(1, 2)?.contiguous();
                LayerKv::append(slot, heads(k)?, heads(v)?)? // (B, KV, past+T, D)
            }
            None => (k, v),
        };
        let y = ops::causal_attention(&q, &k, &v, batch, self.heads, self.kv_heads, mask)?; // (B*T, H*D)
        self.o.forward(&y, ctx)
    }
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let h = ops::swiglu(&self.gate.forward(x, ctx)?, &self.up.forward(x, ctx)?)?; // (B*T, F)
        self.down.forward(&h, ctx)
    }
}

struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    /// The residual block on x (B*T, C): `x + attn(norm(x))`, then `+ mlp(norm(.))`.
    fn forward(
        &self,
        x: Tensor,
        batch: usize,
        rope: (&Tensor, &Tensor),
        mask: &AttentionMask,
        cache: Option<&mut Option<LayerKv>>,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        let a = self.attn.forward(&self.attn_norm.forward(&x)?, batch, rope, mask, cache, ctx)?;
        let x = (x + a)?;
        &x + self.mlp.forward(&self.mlp_norm.forward(&x)?, ctx)?
    }

    /// The same block over detached views of its weights: it records no graph.
    fn detached(&self) -> Self {
        let a = &self.attn;
        Block {
            attn_norm: self.attn_norm.detached(),
            attn: Attention {
                q: a.q.detached(),
                k: a.k.detached(),
                v: a.v.detached(),
                o: a.o.detached(),
                heads: a.heads,
                kv_heads: a.kv_heads,
            },
            mlp_norm: self.mlp_norm.detached(),
            mlp: Mlp { gate: self.mlp.gate.detached(), up: self.mlp.up.detached(), down: self.mlp.down.detached() },
        }
    }
}

/// What gradient checkpointing keeps of a forward pass: each decoder block's input (B*T, C),
/// detached, and the leaf the returned hidden states' graph starts at. See
/// [`Llama::hidden_states_for_training`].
pub struct Checkpoints {
    input_ids: Tensor,
    layout: Layout,
    ctx: Ctx,
    /// x_i, the input of block i (x_0 the embeddings), without a graph.
    inputs: Vec<Tensor>,
    /// The last block's output as a variable: the final norm and everything after it build
    /// their graph from here.
    last: Var,
}

/// Where a forward pass's tokens sit: its batch rows, their rotary tables (cos, sin) and
/// attention mask.
struct Layout {
    batch: usize,
    rope: (Tensor, Tensor),
    mask: AttentionMask,
}

/// The gradients of `sum(y * g)`: a backward pass from `y` seeded with `g`. candle also
/// stores a gradient for the constant `g` itself (a Mul's second operand), and that one
/// references `y`'s graph; it is dropped here, or it would keep every recomputed block's
/// activations alive until the end of the backward pass.
fn backward_from(y: &Tensor, g: &Tensor) -> candle_core::Result<GradStore> {
    let seed = g.detach();
    let mut store = (y * &seed)?.sum_all()?.backward()?;
    store.remove(&seed);
    Ok(store)
}

/// A Llama-family causal language model.
pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor, // (V, C)
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head_t: Tensor, // (C, V): the LM head (the embedding itself when tied), transposed
    rope: Rope,
    /// Round embedding and LM head to bf16 on every pass (as `Linear::round`).
    round: bool,
    precision: Precision,
}

impl Llama {
    /// Builds the network over `params` for `mode`, computing in `precision`. A frozen
    /// (`Mode::Infer`) network rounds bf16 weights once here, a trainable one on every forward
    /// pass, since the optimizer changes the f32 weights between passes.
    pub fn new(cfg: &LlamaConfig, params: &Params, mode: Mode, precision: Precision) -> Result<Self> {
        Self::with_adapters(cfg, params, mode, precision, &[])
    }

    /// [`Llama::new`] with LoRA adapters on top of the base `params`: each adapted linear
    /// layer adds `coefficient * scale * (x A^T) B^T` per adapter (the adapters stay in f32;
    /// a trainable one's matrices are its variables, a frozen one's detached).
    pub fn with_adapters(
        cfg: &LlamaConfig,
        params: &Params,
        mode: Mode,
        precision: Precision,
        adapters: &[AdapterUse],
    ) -> Result<Self> {
        let trainable = mode == Mode::Train;
        let bf16_weights = precision == Precision::Bf16;
        let round = bf16_weights && trainable;
        let get = |name: &str| -> Result<Tensor> {
            let var = params
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor { path: "parameters".into(), name: name.to_string() })?;
            Ok(if trainable { var.as_tensor().clone() } else { rounded(&var.as_detached_tensor(), bf16_weights)? })
        };
        // Infer lays linear weights out for inference (a transposed copy); Train and Frozen
        // keep views of the parameters.
        let view = mode != Mode::Infer;
        let lora_terms = |layer: usize, module: &str| -> Result<Vec<LoraTerm>> {
            let mut terms = Vec::new();
            for use_ in adapters {
                let Some(m) =
                    use_.adapter.modules.iter().find(|m| m.layer == layer && LINEAR_MODULES[m.module] == module)
                else {
                    continue;
                };
                let var = |n: String| -> Result<Tensor> {
                    let v = use_
                        .adapter
                        .params
                        .get(&n)
                        .ok_or(ModelError::MissingTensor { path: "adapter".into(), name: n })?;
                    Ok(if use_.trainable { v.as_tensor().clone() } else { v.as_detached_tensor() })
                };
                terms.push(LoraTerm {
                    a_t: var(m.a_name())?.t()?,
                    b_t: var(m.b_name())?.t()?,
                    scale: use_.coefficient * use_.adapter.config.scale(),
                    dropout: if use_.trainable { use_.adapter.config.dropout } else { 0.0 },
                    // By module alone: the trainable adapter draws the same masks wherever it
                    // sits in a stack (frozen adapters draw none).
                    stream: (layer * LINEAR_MODULES.len() + m.module) as u64,
                });
            }
            Ok(terms)
        };
        let linear = |layer: usize, name: &str, bias: bool| -> Result<Linear> {
            let module = name.rsplit('.').next().unwrap_or(name);
            Ok(Linear {
                weight_t: transposed(get(&format!("{name}.weight"))?, view)?,
                bias: if bias { Some(get(&format!("{name}.bias"))?) } else { None },
                round,
                lora: lora_terms(layer, module)?,
            })
        };
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm { weight: get(&format!("{name}.weight"))?, eps: cfg.rms_norm_eps, round })
        };
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            blocks.push(Block {
                attn_norm: norm(&format!("{p}.input_layernorm"))?,
                attn: Attention {
                    q: linear(i, &format!("{p}.self_attn.q_proj"), cfg.qkv_bias())?,
                    k: linear(i, &format!("{p}.self_attn.k_proj"), cfg.qkv_bias())?,
                    v: linear(i, &format!("{p}.self_attn.v_proj"), cfg.qkv_bias())?,
                    o: linear(i, &format!("{p}.self_attn.o_proj"), cfg.o_bias())?,
                    heads: cfg.num_attention_heads,
                    kv_heads: cfg.num_kv_heads(),
                },
                mlp_norm: norm(&format!("{p}.post_attention_layernorm"))?,
                mlp: Mlp {
                    gate: linear(i, &format!("{p}.mlp.gate_proj"), cfg.mlp_bias)?,
                    up: linear(i, &format!("{p}.mlp.up_proj"), cfg.mlp_bias)?,
                    down: linear(i, &format!("{p}.mlp.down_proj"), cfg.mlp_bias)?,
                },
            });
        }
        let embed = get("model.embed_tokens.weight")?;
        let lm_head = if cfg.tie_word_embeddings { embed.clone() } else { get("lm_head.weight")? };
        let lm_head_t = transposed(lm_head, view)?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm: norm("model.norm")?,
            lm_head_t,
            rope: Rope::new(cfg)?,
            round,
            precision,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Whether a training forward pass draws LoRA dropout masks (a trainable adapter with
    /// `lora_dropout > 0`): those masks are drawn per row of a padded batch.
    pub fn draws_dropout(&self) -> bool {
        self.blocks.iter().any(|b| {
            let (a, m) = (&b.attn, &b.mlp);
            [&a.q, &a.k, &a.v, &a.o, &m.gate, &m.up, &m.down].iter().any(|l| l.lora.iter().any(|t| t.dropout > 0.0))
        })
    }

    /// The precision the network computes its weights in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Logits at every position of a batch without padding or cache: input ids (B, T) u32 ->
    /// (B, T, V). The same as `logits(hidden_states(input_ids, &[], None))`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let h = self.hidden_states(input_ids, &[], None)?;
        self.logits(&h)
    }

    /// Final-norm hidden states (B, T, C) of input ids (B, T) u32: the input to the LM head
    /// ([`Llama::logits`]) or a score head.
    ///
    /// `cache`, when given, holds the keys/values of earlier positions and is extended with
    /// these. `pad_lens` is empty, or gives per batch row the left-padding slots (for
    /// generation, fixed for the prefill and every cached step after it): row b's real tokens
    /// sit at positions 0, 1, ... (as transformers' `position_ids = cumsum(attention_mask) - 1`)
    /// and no query attends to a pad key, so a row's states at real positions are those of
    /// the row run alone. The states at pad positions are meaningless.
    pub fn hidden_states(&self, input_ids: &Tensor, pad_lens: &[usize], cache: Option<&mut KvCache>) -> Result<Tensor> {
        let b = input_ids.dim(0)?;
        if !pad_lens.is_empty() && pad_lens.len() != b {
            return Err(candle_core::Error::Msg(format!("{} pad lengths for a batch of {b}", pad_lens.len())).into());
        }
        let past = cache.as_ref().map_or(0, |c| c.len());
        let layout = self.layout(input_ids, pad_lens, past, &[])?;
        self.run(input_ids, &layout, cache, &Ctx::default())
    }

    /// Logits (B, T, V) from final-norm hidden states (B, T, C): the LM head alone, so a
    /// caller that needs only some positions (the last, when sampling) projects only those.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.project(h)?)
    }

    /// Final-norm hidden states (1, R, C) of a packed row of input ids (1, R) u32: several
    /// sequences side by side without padding, each attending only within its span, at its
    /// own positions (and two completions of one prompt sharing its tokens; see
    /// [`PackedSpan`]). Each span's states are those of its sequences run alone.
    pub fn hidden_states_packed(&self, input_ids: &Tensor, spans: &[PackedSpan]) -> Result<Tensor> {
        let layout = self.layout(input_ids, &[], 0, spans)?;
        self.run(input_ids, &layout, None, &Ctx::default())
    }

    /// The rotary tables and attention mask of input ids (B, T) after `past` cached
    /// positions, left-padded by `pad_lens` (empty or all zero: none) or packed as `spans`
    /// (empty: not packed).
    fn layout(&self, input_ids: &Tensor, pad_lens: &[usize], past: usize, spans: &[PackedSpan]) -> Result<Layout> {
        let (b, t) = input_ids.dims2()?;
        let device = input_ids.device();
        let padded = pad_lens.iter().any(|&p| p > 0);
        let positions: Option<Vec<usize>> = if !spans.is_empty() {
            if b != 1 || past != 0 || padded {
                return Err(candle_core::Error::Msg(format!(
                    "a packed batch is one row without cache or padding, not {b} rows"
                ))
                .into());
            }
            Some(spans.iter().flat_map(|sp| (0..sp.len).map(move |j| sp.position(j))).collect())
        } else if padded {
            // Row b's slot s holds position s - pad_lens[b]; pad slots get 0 (never attended).
            Some(pad_lens.iter().flat_map(|&p| (past..past + t).map(move |s| s.saturating_sub(p))).collect())
        } else {
            None
        };
        let longest = match &positions {
            Some(ps) => ps.iter().max().map_or(0, |&p| p + 1),
            None => past + t,
        };
        if longest > self.cfg.max_position_embeddings {
            return Err(ModelError::SequenceTooLong { positions: longest, max: self.cfg.max_position_embeddings });
        }
        let rope = match &positions {
            Some(ps) => self.rope.tables_at(ps, device)?, // (B*T, D)
            None => self.rope.tables(past, t, device)?,   // (T, D)
        };
        let pad_lens = if padded { pad_lens.to_vec() } else { Vec::new() };
        Ok(Layout { batch: b, rope, mask: AttentionMask { past, pad_lens, spans: spans.to_vec() } })
    }

    /// The network over input ids laid out as `layout`.
    fn run(&self, input_ids: &Tensor, layout: &Layout, mut cache: Option<&mut KvCache>, ctx: &Ctx) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let mut x = self.embed_tokens(input_ids)?; // (B*T, C)
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize_with(self.blocks.len(), || None);
        }
        let rope = (&layout.rope.0, &layout.rope.1);
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = block.forward(x, b, rope, &layout.mask, slot, ctx)?;
        }
        Ok(self.norm.forward(&x)?.reshape((b, t, self.cfg.hidden_size))?)
    }

    /// Final-norm hidden states (B, T, C) of a training batch (no padding, no cache; or one
    /// packed row of `spans`, as [`Llama::hidden_states_packed`]; empty: not packed), with a
    /// graph for the backward pass. `dropout` gives the trainable adapters' dropout masks
    /// (none without adapters or with `lora_dropout = 0`). With `checkpointing` (TRL's
    /// `gradient_checkpointing`) every decoder block runs without a graph and only its input
    /// is kept, so a backward pass needs one block's activations at a time instead of all of
    /// them: the returned states' graph then starts at the last block's output, and after
    /// `loss.backward()` [`Llama::backward_checkpointed`] carries the gradients through the
    /// blocks.
    pub fn hidden_states_for_training(
        &self,
        input_ids: &Tensor,
        spans: &[PackedSpan],
        checkpointing: bool,
        dropout: Option<Dropout>,
    ) -> Result<(Tensor, Option<Checkpoints>)> {
        let ctx = Ctx { dropout: dropout.map(std::sync::Arc::new) };
        let layout = self.layout(input_ids, &[], 0, spans)?;
        if !checkpointing {
            return Ok((self.run(input_ids, &layout, None, &ctx)?, None));
        }
        let (b, t) = input_ids.dims2()?;
        let embed = rounded(&self.embed.detach(), self.round)?;
        let mut x = embed.index_select(&input_ids.flatten_all()?, 0)?; // (B*T, C)
        let mut inputs = Vec::with_capacity(self.blocks.len());
        let rope = (&layout.rope.0, &layout.rope.1);
        for block in &self.blocks {
            inputs.push(x.clone());
            x = block.detached().forward(x, b, rope, &layout.mask, None, &ctx)?;
        }
        let last = Var::from_tensor(&x)?;
        let h = self.norm.forward(last.as_tensor())?.reshape((b, t, self.cfg.hidden_size))?;
        Ok((h, Some(Checkpoints { input_ids: input_ids.clone(), layout, ctx, inputs, last })))
    }

    /// The gradients of a loss over checkpointed hidden states
    /// ([`Llama::hidden_states_for_training`]): `grads`
    /// is `loss.backward()`'s store (gradients of the final norm, the LM head and the last
    /// block's output); each block is recomputed from its kept input, last first, with a graph,
    /// and backpropagated; then the embedding. Returns the store with every parameter's
    /// gradient, as `loss.backward()` would without checkpointing. Can be called more than
    /// once per forward pass (each call recomputes).
    pub fn backward_checkpointed(&self, ckpt: &Checkpoints, mut grads: GradStore) -> Result<GradStore> {
        let Some(mut g) = grads.remove(ckpt.last.as_tensor()) else {
            return Ok(grads); // the loss does not reach the blocks
        };
        let (layout, rope) = (&ckpt.layout, (&ckpt.layout.rope.0, &ckpt.layout.rope.1));
        for (block, x) in self.blocks.iter().zip(&ckpt.inputs).rev() {
            let x = Var::from_tensor(x)?;
            let y = block.forward(x.as_tensor().clone(), layout.batch, rope, &layout.mask, None, &ckpt.ctx)?;
            let mut store = backward_from(&y, &g)?;
            g = store.remove(x.as_tensor()).ok_or_else(|| {
                candle_core::Error::Msg("gradient checkpointing: no gradient reached a block's input".into())
            })?;
            grads.extend(store)?;
        }
        let x0 = self.embed_tokens(&ckpt.input_ids)?;
        grads.extend(backward_from(&x0, &g)?)?;
        Ok(grads)
    }

    /// `log softmax(logits)[target]` of hidden-state rows h (R, C) through the LM head, one
    /// target per row, as one fused op that never holds the (R, V) logits (`ops::token_logps`);
    /// (R,), f32, differentiable in h and the LM head.
    pub fn token_logps(&self, h: &Tensor, targets: &[u32]) -> Result<Tensor> {
        Ok(ops::token_logps(h, &rounded(&self.lm_head_t, self.round)?, targets)?)
    }

    /// The mean logit over the vocabulary of each row of h (R, C), without the logits:
    /// `h . mean_v(W^T[:, v])`, detached (TRL's `logits/chosen` metric).
    pub fn mean_logits(&self, h: &Tensor) -> Result<Tensor> {
        let w_mean = self.lm_head_t.detach().mean_keepdim(1)?; // (C, 1)
        Ok(h.detach().matmul(&w_mean)?.squeeze(1)?)
    }

    /// The input embedding of ids (B, T): rows (B*T, C). As transformers' `nn.Embedding` with
    /// `padding_idx = pad_token_id`, positions holding the pad id pass no gradient to the
    /// embedding (their values are unchanged: `x m + detach(x) (1 - m)` is x exactly).
    fn embed_tokens(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        let ids = input_ids.flatten_all()?;
        let x = rounded(&self.embed, self.round)?.index_select(&ids, 0)?;
        let Some(pad) = self.cfg.pad_token_id.filter(|_| x.track_op()) else { return Ok(x) };
        let ids_host: Vec<u32> = ids.to_vec1()?;
        if !ids_host.contains(&pad) {
            return Ok(x);
        }
        let keep: Vec<f32> = ids_host.iter().map(|&i| if i == pad { 0.0 } else { 1.0 }).collect();
        let keep = Tensor::from_vec(keep, (ids_host.len(), 1), x.device())?;
        let frozen = x.detach().broadcast_mul(&keep.affine(-1.0, 1.0)?)?;
        x.broadcast_mul(&keep)? + frozen
    }

    fn project(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, c) = h.dims3()?;
        h.reshape((b * t, c))?.matmul(&rounded(&self.lm_head_t, self.round)?)?.reshape((b, t, self.cfg.vocab_size))
    }
}
