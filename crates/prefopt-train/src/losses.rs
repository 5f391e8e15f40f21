//! The pairwise preference-loss family (methods.md section 2), by TRL's `loss_type` names.
//!
//! Input: per-sequence completion log-probs summed over tokens (what [`crate::logps`] returns),
//! shape (B,). Training runs in f32; any float dtype works (the tests also run f64). Every
//! loss is built from candle ops that have a backward pass, so `loss.backward()` reaches the
//! policy log-probs. Reference log-probs, lengths and win probabilities are data: they are
//! detached, whatever graph they come from.
//!
//! Checked against TRL's source (huggingface/trl main, July 2026: `DPOTrainer._compute_loss`
//! and the experimental `CPOTrainer`; the cross-check fixture records TRL 1.16). Where prefopt
//! differs, methods.md is the spec:
//! - `sigmoid` with `label_smoothing > 0` is cDPO here. TRL's `DPOTrainer` ignores
//!   `label_smoothing` for `sigmoid` (it uses it only in `robust`, `exo_pair`, `aot*`); cDPO is
//!   `CPOTrainer`'s `sigmoid` and TRL < 1.0's `DPOTrainer`.
//! - `robust` with `label_smoothing` outside `[0, 0.5)` is an error here; TRL only warns.
//! - `simpo` is `CPOTrainer`'s `loss_type="simpo"`, which also applies `label_smoothing`;
//!   methods.md's row has no smoothing, so `simpo` ignores it here.
//! - `sppo` (soft, with win probabilities) and `dpop` (DPO-Positive) are not in TRL; they
//!   follow methods.md.
//! - `sft`: methods.md's row (the default, [`SftNorm::PerPair`]) is the mean over pairs of
//!   `-lp(y_w)/|y_w|`; TRL's `sft` is one token mean over all chosen completion tokens of the
//!   batch ([`SftNorm::TokenMean`]).
//! - Lengths are clamped to `>= 1` in every length-normalized term (`ipo`, `simpo`, `sft`), as
//!   TRL's `DPOTrainer` does for `ipo`, so an empty completion gives 0, not NaN (TRL's
//!   `CPOTrainer` does not clamp for `simpo`).
//! - Gradients at kinks: `logsig` has its exact derivative `sigmoid(-z)` everywhere, `z = 0`
//!   included (the point every run starts at, policy = reference). `hinge`'s `max(0, .)` has
//!   gradient 0 at 0 (`torch.relu`); `dpop`'s `max(0, lp_ref - lp)` has gradient 1 at 0
//!   (`torch.clamp(min=0)`, which the fixture script uses), so the penalty is already active at
//!   the start of a run.
//!
//! Not implemented: TRL's other loss types (`exo_pair`, `bco_pair`, `aot`, `aot_unpaired`,
//! `apo_zero`, `apo_down`, `discopop`, `sigmoid_norm`), `f_divergence_type`, WPO weighting and
//! `ld_alpha`.

use candle_core::{DType, Tensor};

/// Errors of the loss family and of the SPO terms.
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    #[error("loss `{loss}` needs reference log-probs (`ref_chosen` and `ref_rejected`)")]
    MissingReference { loss: &'static str },
    #[error("loss `{loss}` needs win probabilities (`win_prob_chosen` and `win_prob_rejected`)")]
    MissingWinProbs { loss: &'static str },
    #[error("{param} must be {expected} for `{loss}`, got {value}")]
    BadParam { loss: &'static str, param: &'static str, expected: &'static str, value: f64 },
    #[error("`{name}` has shape {got:?}, expected ({b},) like `chosen`")]
    Shape { name: &'static str, got: Vec<usize>, b: usize },
    #[error("`chosen` must have shape (B,) with B >= 1, got {0:?}")]
    BatchShape(Vec<usize>),
    #[error("`{name}` has dtype {got:?}, expected {want:?} like `chosen`")]
    DType { name: &'static str, got: DType, want: DType },
    #[error("`{loss}` is not a loss on chosen/rejected pairs")]
    NotPairLoss { loss: &'static str },
    #[error("no loss terms given")]
    NoTerms,
    #[error("gradient lists do not match: {0}")]
    GradMismatch(String),
    #[error("non-finite value: {0}")]
    NonFinite(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The rows of methods.md section 2, by TRL's `loss_type` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// DPO, `-logsig(beta*h)`; cDPO when `label_smoothing > 0`.
    Sigmoid,
    /// Robust DPO (Chowdhury et al. 2024), unbiased under label noise `label_smoothing`.
    Robust,
    /// SLiC, `max(0, 1 - beta*h)`.
    Hinge,
    /// IPO (Azar et al. 2023), length-normalized as in TRL.
    Ipo,
    /// SPPO with hard win probabilities (1 for chosen, 0 for rejected).
    SppoHard,
    /// SPPO with estimated win probabilities `p_w`, `p_l`.
    Sppo,
    /// NCA (Chen et al. 2024), pairwise form.
    NcaPair,
    /// SimPO (Meng et al. 2024): length-normalized, margin `simpo_gamma`, no reference.
    Simpo,
    /// DPO-Positive (Pal et al. 2024): DPO plus a penalty when `lp(y_w)` falls below the reference's.
    Dpop,
    /// Token-mean NLL of the chosen completion (RPO's extra term).
    Sft,
    /// CPO (Xu et al. 2024; TRL `CPOTrainer`, `loss_type="sigmoid"`): `-logsig(beta (lp_w -
    /// lp_l))` (cDPO's smoothing with `label_smoothing`), no reference, plus `cpo_alpha` times
    /// the chosen completion's NLL, averaged as the `sft` term is (`SftNorm`).
    Cpo,
    /// R-DPO (Park et al. 2024): DPO with a length term in the margin,
    /// `-logsig(beta h - rdpo_alpha (|y_w| - |y_l|))`.
    Rdpo,
    /// KTO (Ethayarajh et al. 2024; TRL `KTOTrainer`): not a pair loss; on unpaired data
    /// (`prompt`, `completion`, `label`), by its own objective (`kto.rs`).
    Kto,
}

impl LossType {
    /// Every loss on chosen/rejected pairs (all but `kto`).
    pub const PAIR_LOSSES: [LossType; 12] = [
        LossType::Sigmoid,
        LossType::Robust,
        LossType::Hinge,
        LossType::Ipo,
        LossType::SppoHard,
        LossType::Sppo,
        LossType::NcaPair,
        LossType::Simpo,
        LossType::Dpop,
        LossType::Sft,
        LossType::Cpo,
        LossType::Rdpo,
    ];

    /// TRL's `loss_type` string.
    pub fn name(&self) -> &'static str {
        match self {
            LossType::Sigmoid => "sigmoid",
            LossType::Robust => "robust",
            LossType::Hinge => "hinge",
            LossType::Ipo => "ipo",
            LossType::SppoHard => "sppo_hard",
            LossType::Sppo => "sppo",
            LossType::NcaPair => "nca_pair",
            LossType::Simpo => "simpo",
            LossType::Dpop => "dpop",
            LossType::Sft => "sft",
            LossType::Cpo => "cpo",
            LossType::Rdpo => "rdpo",
            LossType::Kto => "kto",
        }
    }

    /// Whether the loss reads reference log-probs (all but `simpo`, `sft` and `cpo`).
    pub fn needs_reference(&self) -> bool {
        !matches!(self, LossType::Simpo | LossType::Sft | LossType::Cpo)
    }

    /// Whether shifting both reference log-probs of a pair by the same amount leaves the loss
    /// unchanged: true where the loss sees the reference only through `rho_w - rho_l` with
    /// equal weights (`sigmoid` and cDPO, `robust`, `hinge`) and for the reference-free ones.
    /// APO's exact extrapolated reference is known only up to such a prompt-only shift, its
    /// normalizer `log Z'(x)` (methods.md section 3).
    pub fn ignores_reference_shift(&self) -> bool {
        matches!(
            self,
            LossType::Sigmoid
                | LossType::Robust
                | LossType::Hinge
                | LossType::Rdpo
                | LossType::Simpo
                | LossType::Sft
                | LossType::Cpo
        )
    }

    /// Whether the loss reads estimated win probabilities (`sppo` only).
    pub fn needs_win_probs(&self) -> bool {
        matches!(self, LossType::Sppo)
    }

    /// Parses a TRL `loss_type` name; the error lists the valid names.
    pub fn parse(s: &str) -> Result<Self, String> {
        let all = || Self::PAIR_LOSSES.into_iter().chain([LossType::Kto]);
        all().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<&str> = all().map(|k| k.name()).collect();
            format!("unknown loss type `{s}`; expected one of: {}", names.join(", "))
        })
    }
}

impl std::fmt::Display for LossType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LossType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

/// How the `sft` term averages the chosen completion's NLL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SftNorm {
    /// methods.md: per pair `-lp(y_w)/|y_w|`, then the mean over pairs (every pair weighs the same).
    #[default]
    PerPair,
    /// TRL's `sft`: `-sum_i lp(y_w,i) / sum_i |y_w,i|`, the mean over all chosen completion
    /// tokens of the batch (long completions weigh more). The per-pair vector is this scalar
    /// repeated, so its mean is the batch loss.
    TokenMean,
}

/// Knobs shared by the family, with TRL's names.
#[derive(Clone, Debug, PartialEq)]
pub struct LossParams {
    /// Inverse temperature of the implicit reward (for `ipo`, the regularization `tau`). TRL 0.1.
    pub beta: f64,
    /// `e`: cDPO's label smoothing for `sigmoid`, the label-noise rate for `robust`. TRL 0.0.
    pub label_smoothing: f64,
    /// SimPO's target margin `gamma` (TRL `CPOConfig.simpo_gamma`, default 0.5; 1.375 with beta 2.5 is common).
    pub simpo_gamma: f64,
    /// DPO-Positive's penalty weight `lam` (50 is common).
    pub dpop_lambda: f64,
    /// Averaging of the `sft` term (not a TRL knob: TRL has only [`SftNorm::TokenMean`]).
    pub sft_norm: SftNorm,
    /// CPO's weight of the chosen NLL (TRL `CPOConfig.cpo_alpha`, default 1.0).
    pub cpo_alpha: f64,
    /// R-DPO's length weight `alpha` per token of length difference (prefopt's default 0.01,
    /// inside the paper's range; 0 is DPO).
    pub rdpo_alpha: f64,
}

impl Default for LossParams {
    fn default() -> Self {
        Self {
            beta: 0.1,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            dpop_lambda: 50.0,
            sft_norm: SftNorm::PerPair,
            cpo_alpha: 1.0,
            rdpo_alpha: 0.01,
        }
    }
}

impl LossParams {
    /// Refuses parameters out of range for `kind`; parameters `kind` does not read are not checked.
    pub fn check(&self, kind: LossType) -> Result<(), LossError> {
        let loss = kind.name();
        let bad = |param, expected, value| Err(LossError::BadParam { loss, param, expected, value });
        if kind != LossType::Sft && !(self.beta.is_finite() && self.beta > 0.0) {
            return bad("beta", "> 0", self.beta);
        }
        let e = self.label_smoothing;
        let smoothed = matches!(kind, LossType::Sigmoid | LossType::Robust | LossType::Cpo);
        match kind {
            _ if smoothed && (e.is_nan() || e < 0.0) => bad("label_smoothing", ">= 0", e),
            LossType::Sigmoid | LossType::Cpo if e > 0.5 => bad("label_smoothing", "<= 0.5", e),
            LossType::Cpo if !(self.cpo_alpha.is_finite() && self.cpo_alpha >= 0.0) => {
                bad("cpo_alpha", ">= 0", self.cpo_alpha)
            }
            LossType::Rdpo if !self.rdpo_alpha.is_finite() => bad("rdpo_alpha", "finite", self.rdpo_alpha),
            LossType::Robust if e >= 0.5 => bad("label_smoothing", "< 0.5", e),
            LossType::Simpo if !self.simpo_gamma.is_finite() => bad("simpo_gamma", "finite", self.simpo_gamma),
            LossType::Dpop if !(self.dpop_lambda.is_finite() && self.dpop_lambda >= 0.0) => {
                bad("dpop_lambda", ">= 0", self.dpop_lambda)
            }
            _ => Ok(()),
        }
    }
}

/// What one batch of B pairs provides. Log-probs are summed over completion tokens, (B,).
pub struct PairLogps<'a> {
    /// `lp(y_w)` under the policy (differentiable).
    pub chosen: &'a Tensor,
    /// `lp(y_l)` under the policy (differentiable).
    pub rejected: &'a Tensor,
    /// `lp_ref(y_w)`; required by every loss but `simpo` and `sft`.
    pub ref_chosen: Option<&'a Tensor>,
    pub ref_rejected: Option<&'a Tensor>,
    /// `|y_w|`, `|y_l|`: completion token counts, as floats.
    pub chosen_lens: &'a Tensor,
    pub rejected_lens: &'a Tensor,
    /// SPPO's estimated win probabilities `p_w`, `p_l` (soft `sppo` only).
    pub win_prob_chosen: Option<&'a Tensor>,
    pub win_prob_rejected: Option<&'a Tensor>,
}

impl PairLogps<'_> {
    /// Batch size, after checking that every given tensor is (B,) with `chosen`'s dtype.
    fn check(&self) -> Result<usize, LossError> {
        let b = match self.chosen.dims() {
            [b] if *b > 0 => *b,
            d => return Err(LossError::BatchShape(d.to_vec())),
        };
        let want = self.chosen.dtype();
        let named = [
            ("rejected", Some(self.rejected)),
            ("ref_chosen", self.ref_chosen),
            ("ref_rejected", self.ref_rejected),
            ("chosen_lens", Some(self.chosen_lens)),
            ("rejected_lens", Some(self.rejected_lens)),
            ("win_prob_chosen", self.win_prob_chosen),
            ("win_prob_rejected", self.win_prob_rejected),
        ];
        for (name, t) in named {
            let Some(t) = t else { continue };
            if t.dims() != [b] {
                return Err(LossError::Shape { name, got: t.dims().to_vec(), b });
            }
            if t.dtype() != want {
                return Err(LossError::DType { name, got: t.dtype(), want });
            }
        }
        Ok(b)
    }

    /// Reference log-probs (detached), or the error naming the loss that needed them.
    fn reference(&self, kind: LossType) -> Result<(Tensor, Tensor), LossError> {
        match (self.ref_chosen, self.ref_rejected) {
            (Some(w), Some(l)) => Ok((w.detach(), l.detach())),
            _ => Err(LossError::MissingReference { loss: kind.name() }),
        }
    }

    /// `rho_w = lp(y_w) - lp_ref(y_w)`, `rho_l` likewise.
    fn log_ratios(&self, kind: LossType) -> Result<(Tensor, Tensor), LossError> {
        let (ref_w, ref_l) = self.reference(kind)?;
        Ok(((self.chosen - ref_w)?, (self.rejected - ref_l)?))
    }

    /// `|y_w|`, `|y_l|` clamped to >= 1 (detached).
    fn lens(&self) -> Result<(Tensor, Tensor), LossError> {
        Ok((self.chosen_lens.detach().maximum(1.0)?, self.rejected_lens.detach().maximum(1.0)?))
    }
}

/// `logsig(z) = min(z, 0) - ln(1 + exp(-|z|))`, stable for any `z`.
///
/// `min` and `|.|` are written with a constant sign mask so that the gradient is exactly
/// `sigmoid(-z)` everywhere: with candle's `minimum`/`abs` backward it would be 1 at `z = 0`
/// instead of 0.5, i.e. twice DPO's gradient on the first step (policy = reference).
pub(crate) fn log_sigmoid(z: &Tensor) -> candle_core::Result<Tensor> {
    let pos = z.ge(0.0)?.to_dtype(z.dtype())?.detach(); // 1 where z >= 0, else 0
    let abs = (z * pos.affine(2.0, -1.0)?)?; // |z|
    let min0 = (z * pos.affine(-1.0, 1.0)?)?; // min(z, 0)
    let softplus = (abs.neg()?.exp()? + 1.0)?.log()?; // ln(1 + exp(-|z|)), in (0, ln 2]
    min0 - softplus
}

/// `max(0, x)` with gradient 0 at `x = 0` (torch.relu's convention; candle's `relu` gives 1).
pub(crate) fn relu_strict(x: &Tensor) -> candle_core::Result<Tensor> {
    x * x.gt(0.0)?.to_dtype(x.dtype())?.detach()
}

/// Per-pair loss (B,) of one row of methods.md section 2.
///
/// Errors when an input the loss needs is missing (reference log-probs, win probabilities for
/// `sppo`), when the tensors' shapes or dtypes disagree, or when a parameter is out of range.
pub fn pair_loss(kind: LossType, p: &LossParams, x: &PairLogps) -> Result<Tensor, LossError> {
    let b = x.check()?;
    p.check(kind)?;
    let beta = p.beta;
    let e = p.label_smoothing;
    let loss = match kind {
        LossType::Sigmoid => {
            // cDPO: -(1-e)*logsig(beta*h) - e*logsig(-beta*h); e = 0 is DPO.
            let z = margin(kind, x)?.affine(beta, 0.0)?;
            (log_sigmoid(&z)?.affine(-(1.0 - e), 0.0)? - log_sigmoid(&z.neg()?)?.affine(e, 0.0)?)?
        }
        LossType::Robust => {
            // (-(1-e)*logsig(beta*h) + e*logsig(-beta*h)) / (1-2e)
            let z = margin(kind, x)?.affine(beta, 0.0)?;
            let d = 1.0 - 2.0 * e;
            (log_sigmoid(&z)?.affine(-(1.0 - e) / d, 0.0)? + log_sigmoid(&z.neg()?)?.affine(e / d, 0.0)?)?
        }
        LossType::Hinge => relu_strict(&margin(kind, x)?.affine(-beta, 1.0)?)?,
        LossType::Ipo => {
            // (hbar - 1/(2 beta))^2, hbar = rho_w/|y_w| - rho_l/|y_l|
            let (rho_w, rho_l) = x.log_ratios(kind)?;
            let (n_w, n_l) = x.lens()?;
            let hbar = ((rho_w / n_w)? - (rho_l / n_l)?)?;
            hbar.affine(1.0, -0.5 / beta)?.sqr()?
        }
        LossType::SppoHard => {
            let (rho_w, rho_l) = x.log_ratios(kind)?;
            (rho_w.affine(1.0, -0.5 / beta)?.sqr()? + rho_l.affine(1.0, 0.5 / beta)?.sqr()?)?
        }
        LossType::Sppo => {
            // 0.5*[(rho_w - (p_w - 0.5)/beta)^2 + (rho_l - (p_l - 0.5)/beta)^2]
            let (rho_w, rho_l) = x.log_ratios(kind)?;
            let (p_w, p_l) = match (x.win_prob_chosen, x.win_prob_rejected) {
                (Some(w), Some(l)) => (w.detach(), l.detach()),
                _ => return Err(LossError::MissingWinProbs { loss: kind.name() }),
            };
            let target = |p: &Tensor| p.affine(1.0 / beta, -0.5 / beta);
            let err_w = (rho_w - target(&p_w)?)?.sqr()?;
            let err_l = (rho_l - target(&p_l)?)?.sqr()?;
            (err_w + err_l)?.affine(0.5, 0.0)?
        }
        LossType::NcaPair => {
            // -logsig(beta*rho_w) - 0.5*logsig(-beta*rho_w) - 0.5*logsig(-beta*rho_l)
            let (rho_w, rho_l) = x.log_ratios(kind)?;
            let cr = rho_w.affine(beta, 0.0)?;
            let rr = rho_l.affine(beta, 0.0)?;
            let a = log_sigmoid(&cr)?.neg()?;
            let c = (log_sigmoid(&cr.neg()?)? + log_sigmoid(&rr.neg()?)?)?.affine(-0.5, 0.0)?;
            (a + c)?
        }
        LossType::Simpo => {
            // -logsig(beta*lp(y_w)/|y_w| - beta*lp(y_l)/|y_l| - gamma)
            let (n_w, n_l) = x.lens()?;
            let avg = ((x.chosen / n_w)? - (x.rejected / n_l)?)?;
            log_sigmoid(&avg.affine(beta, -p.simpo_gamma)?)?.neg()?
        }
        LossType::Dpop => {
            // -logsig(beta*(h - lam*max(0, lp_ref(y_w) - lp(y_w))))
            let (ref_w, ref_l) = x.reference(kind)?;
            let h = ((x.chosen - &ref_w)? - (x.rejected - ref_l)?)?;
            let shortfall = (ref_w - x.chosen)?.relu()?; // gradient 1 at 0, like torch.clamp(min=0)
            let z = (h - shortfall.affine(p.dpop_lambda, 0.0)?)?.affine(beta, 0.0)?;
            log_sigmoid(&z)?.neg()?
        }
        LossType::Sft => chosen_nll(p.sft_norm, x, b)?,
        LossType::Cpo => {
            // cDPO's form on lp_w - lp_l (no reference), plus cpo_alpha * NLL(y_w).
            let z = (x.chosen - x.rejected)?.affine(beta, 0.0)?;
            let pref = (log_sigmoid(&z)?.affine(-(1.0 - e), 0.0)? - log_sigmoid(&z.neg()?)?.affine(e, 0.0)?)?;
            (pref + chosen_nll(p.sft_norm, x, b)?.affine(p.cpo_alpha, 0.0)?)?
        }
        LossType::Rdpo => {
            // -logsig(beta*h - rdpo_alpha*(|y_w| - |y_l|)); lengths are data.
            let (n_w, n_l) = (x.chosen_lens.detach(), x.rejected_lens.detach());
            let z = (margin(kind, x)?.affine(beta, 0.0)? - (n_w - n_l)?.affine(p.rdpo_alpha, 0.0)?)?;
            log_sigmoid(&z)?.neg()?
        }
        LossType::Kto => return Err(LossError::NotPairLoss { loss: kind.name() }),
    };
    Ok(loss)
}

/// The chosen completion's NLL per pair (B,), averaged as `norm` says (the `sft` row, and
/// CPO's NLL term).
fn chosen_nll(norm: SftNorm, x: &PairLogps, b: usize) -> Result<Tensor, LossError> {
    Ok(match norm {
        SftNorm::PerPair => (x.chosen / x.lens()?.0)?.neg()?,
        SftNorm::TokenMean => {
            let tokens = x.chosen_lens.detach().sum_all()?.maximum(1.0)?;
            (x.chosen.sum_all()? / tokens)?.neg()?.broadcast_as(b)?
        }
    })
}

/// `h = rho_w - rho_l`.
fn margin(kind: LossType, x: &PairLogps) -> Result<Tensor, LossError> {
    let (rho_w, rho_l) = x.log_ratios(kind)?;
    Ok((rho_w - rho_l)?)
}

/// Weighted sum of several losses' batch means: TRL's `loss_type = [..]` with
/// `loss_weights`; `[(Sigmoid, 1), (Sft, alpha)]` is RPO. Returns the scalar loss (rank 0,
/// differentiable).
pub fn combined_loss(terms: &[(LossType, f64)], p: &LossParams, x: &PairLogps) -> Result<Tensor, LossError> {
    let mut total: Option<Tensor> = None;
    for &(kind, weight) in terms {
        if !weight.is_finite() {
            return Err(LossError::BadParam {
                loss: kind.name(),
                param: "loss weight",
                expected: "finite",
                value: weight,
            });
        }
        let term = pair_loss(kind, p, x)?.mean_all()?.affine(weight, 0.0)?;
        total = Some(match total {
            None => term,
            Some(t) => (t + term)?,
        });
    }
    total.ok_or(LossError::NoTerms)
}

/// TRL's reward metrics for one batch, as f64 means over pairs.
#[derive(Clone, Debug, PartialEq)]
pub struct RewardMetrics {
    /// `rewards/chosen = mean(beta*rho_w)`.
    pub chosen: f64,
    /// `rewards/rejected = mean(beta*rho_l)`.
    pub rejected: f64,
    /// `rewards/margins = mean(beta*(rho_w - rho_l))`.
    pub margins: f64,
    /// `rewards/accuracies = mean(rho_w > rho_l)` (strict, as TRL).
    pub accuracies: f64,
    /// `logps/chosen = mean(lp(y_w))`.
    pub logps_chosen: f64,
    /// `logps/rejected = mean(lp(y_l))`.
    pub logps_rejected: f64,
}

impl RewardMetrics {
    /// The values under TRL's metric names, for logs and dashboards.
    pub fn named(&self) -> [(&'static str, f64); 6] {
        [
            ("rewards/chosen", self.chosen),
            ("rewards/rejected", self.rejected),
            ("rewards/margins", self.margins),
            ("rewards/accuracies", self.accuracies),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
        ]
    }
}

/// TRL's reward metrics, computed in f64 on the host from the batch's log-probs.
///
/// With reference log-probs, `rho = lp - lp_ref` (TRL's `DPOTrainer`; used for every loss when
/// a reference is given, `simpo` included, as in the trajectory fixtures). Without them (a
/// reference-free run) `rho = lp`, the summed log-prob; TRL's `CPOTrainer` would log
/// `beta*lp/|y|` for SimPO instead. Giving only one of the two reference tensors is an error.
pub fn reward_metrics(beta: f64, x: &PairLogps) -> Result<RewardMetrics, LossError> {
    x.check()?;
    let host = |t: &Tensor| -> Result<Vec<f64>, LossError> { Ok(t.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?) };
    let lp_w = host(x.chosen)?;
    let lp_l = host(x.rejected)?;
    let (rho_w, rho_l): (Vec<f64>, Vec<f64>) = match (x.ref_chosen, x.ref_rejected) {
        (Some(rw), Some(rl)) => {
            let (rw, rl) = (host(rw)?, host(rl)?);
            (lp_w.iter().zip(&rw).map(|(a, b)| a - b).collect(), lp_l.iter().zip(&rl).map(|(a, b)| a - b).collect())
        }
        (None, None) => (lp_w.clone(), lp_l.clone()),
        _ => return Err(LossError::MissingReference { loss: "reward metrics" }),
    };
    let n = lp_w.len() as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / n;
    let margins: Vec<f64> = rho_w.iter().zip(&rho_l).map(|(w, l)| beta * (w - l)).collect();
    let wins = rho_w.iter().zip(&rho_l).filter(|(w, l)| w > l).count() as f64;
    Ok(RewardMetrics {
        chosen: beta * mean(&rho_w),
        rejected: beta * mean(&rho_l),
        margins: mean(&margins),
        accuracies: wins / n,
        logps_chosen: mean(&lp_w),
        logps_rejected: mean(&lp_l),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use serde_json::Value;

    const CROSSCHECK: &str =
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/expected/train/losses_crosscheck.json"));

    /// TRL loss types in the fixture that prefopt does not implement.
    const NOT_IMPLEMENTED: [&str; 5] = ["bco_pair", "apo_zero", "apo_down", "exo_pair", "sigmoid_norm"];

    fn fixture() -> Value {
        serde_json::from_str(CROSSCHECK).unwrap()
    }

    fn floats(v: &Value) -> Vec<f64> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    }

    /// The cross-check inputs as tensors of one dtype.
    struct Inputs {
        t: Vec<Tensor>, // lp_w, lp_l, ref_w, ref_l, len_w, len_l, p_w, p_l
    }

    impl Inputs {
        fn new(fx: &Value, dtype: DType) -> Self {
            let inp = &fx["inputs"];
            let keys = ["lp_w", "lp_l", "ref_w", "ref_l", "len_w", "len_l", "sppo_p_w", "sppo_p_l"];
            let t = keys
                .iter()
                .map(|k| Tensor::new(floats(&inp[*k]), &Device::Cpu).unwrap().to_dtype(dtype).unwrap())
                .collect();
            Self { t }
        }

        fn pairs(&self) -> PairLogps<'_> {
            let t = &self.t;
            PairLogps {
                chosen: &t[0],
                rejected: &t[1],
                ref_chosen: Some(&t[2]),
                ref_rejected: Some(&t[3]),
                chosen_lens: &t[4],
                rejected_lens: &t[5],
                win_prob_chosen: Some(&t[6]),
                win_prob_rejected: Some(&t[7]),
            }
        }
    }

    /// Our loss and parameters for a fixture entry (None: a TRL extra we do not implement).
    fn ours(name: &str, params: &Value) -> Option<(Vec<(LossType, f64)>, LossParams)> {
        let mut p = LossParams::default();
        let get = |k: &str| params.get(k).and_then(Value::as_f64);
        if let Some(b) = get("beta") {
            p.beta = b;
        }
        if let Some(e) = get("label_smoothing") {
            p.label_smoothing = e;
        }
        if let Some(g) = get("gamma") {
            p.simpo_gamma = g;
        }
        if let Some(l) = get("lambda") {
            p.dpop_lambda = l;
        }
        if let Some(a) = get("cpo_alpha") {
            p.cpo_alpha = a;
        }
        if let Some(a) = get("rdpo_alpha") {
            p.rdpo_alpha = a;
        }
        let terms = match name {
            "cdpo" => vec![(LossType::Sigmoid, 1.0)],
            "sft_tokenmean" => {
                p.sft_norm = SftNorm::TokenMean;
                vec![(LossType::Sft, 1.0)]
            }
            "sigmoid+sft" => vec![(LossType::Sigmoid, 1.0), (LossType::Sft, 1.0)],
            _ if NOT_IMPLEMENTED.contains(&name) => return None,
            _ => vec![(LossType::parse(name).unwrap_or_else(|e| panic!("fixture loss {name}: {e}")), 1.0)],
        };
        Some((terms, p))
    }

    /// Max abs error over per-pair values and the mean, for every implemented fixture loss.
    fn crosscheck_errors(dtype: DType) -> Vec<(String, f64)> {
        let fx = fixture();
        let inputs = Inputs::new(&fx, dtype);
        let x = inputs.pairs();
        let mut out = vec![];
        let mut covered = std::collections::HashSet::new();
        for (name, entry) in fx["losses"].as_object().unwrap() {
            let Some((terms, p)) = ours(name, &entry["params"]) else {
                continue;
            };
            let mut err: f64 = 0.0;
            if let [(kind, _)] = terms[..] {
                covered.insert(kind);
                if !entry["per_pair"].is_null() {
                    let got = pair_loss(kind, &p, &x).unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
                    let want = floats(&entry["per_pair"]);
                    assert_eq!(got.len(), want.len());
                    for (g, w) in got.iter().zip(&want) {
                        err = err.max((g - w).abs());
                    }
                }
            }
            let mean = combined_loss(&terms, &p, &x).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            err = err.max((mean - entry["mean"].as_f64().unwrap()).abs());
            out.push((name.clone(), err));
        }
        assert_eq!(covered.len(), LossType::PAIR_LOSSES.len(), "every loss type has a cross-check entry");
        out
    }

    #[test]
    fn crosscheck_matches_trl_to_1e6_in_f64() {
        for (name, err) in crosscheck_errors(DType::F64) {
            println!("f64 {name:14} max abs err {err:.3e}");
            assert!(err < 1e-6, "{name}: {err}");
        }
    }

    #[test]
    fn crosscheck_matches_trl_to_1e5_in_f32() {
        for (name, err) in crosscheck_errors(DType::F32) {
            println!("f32 {name:14} max abs err {err:.3e}");
            assert!(err < 1e-5, "{name}: {err}");
        }
    }

    #[test]
    fn reward_metrics_match_fixture() {
        let fx = fixture();
        let want = &fx["metrics_beta_0.1"];
        for dtype in [DType::F64, DType::F32] {
            let inputs = Inputs::new(&fx, dtype);
            let m = reward_metrics(0.1, &inputs.pairs()).unwrap();
            for (name, got) in m.named() {
                let w = want[name].as_f64().unwrap();
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
                assert!((got - w).abs() < tol, "{dtype:?} {name}: {got} vs {w}");
            }
        }
    }

    /// Every step of every trajectory fixture: our loss and reward metrics from the recorded
    /// per-example log-probs match the recorded ones (both `sft` normalizations, real lengths).
    #[test]
    fn trajectory_losses_and_metrics_match_recorded_steps() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/expected/train");
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("traj_"))
            .collect();
        files.sort();
        assert!(files.len() >= 14, "{files:?}");
        let mut worst = [0f64; 2]; // max relative loss error, f32 and f64
        for path in files {
            let fx: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let (mut terms, mut p) = (vec![], LossParams::default());
            for t in fx["loss_terms"].as_array().unwrap() {
                let (name, w) = (t["name"].as_str().unwrap(), t["weight"].as_f64().unwrap());
                let (ts, q) = ours(name, &fx["params"]).unwrap();
                terms.push((ts[0].0, w));
                p.beta = q.beta;
                p.label_smoothing = q.label_smoothing;
                p.simpo_gamma = q.simpo_gamma;
                if name == "sft_tokenmean" {
                    p.sft_norm = SftNorm::TokenMean;
                }
            }
            let v = |x: &Value| Tensor::new(floats(x), &Device::Cpu).unwrap();
            let (ref_w, ref_l) = (v(&fx["reference"]["logp_chosen"]), v(&fx["reference"]["logp_rejected"]));
            let (n_w, n_l) = (v(&fx["n_tokens_chosen"]), v(&fx["n_tokens_rejected"]));
            for step in fx["steps"].as_array().unwrap() {
                let (lp_w, lp_l) = (v(&step["per_example"]["logp_chosen"]), v(&step["per_example"]["logp_rejected"]));
                for dtype in [DType::F32, DType::F64] {
                    let t: Vec<Tensor> =
                        [&lp_w, &lp_l, &ref_w, &ref_l, &n_w, &n_l].iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
                    let x = PairLogps {
                        chosen: &t[0],
                        rejected: &t[1],
                        ref_chosen: Some(&t[2]),
                        ref_rejected: Some(&t[3]),
                        chosen_lens: &t[4],
                        rejected_lens: &t[5],
                        win_prob_chosen: None,
                        win_prob_rejected: None,
                    };
                    let got = combined_loss(&terms, &p, &x).unwrap().to_dtype(DType::F64).unwrap();
                    let got = got.to_scalar::<f64>().unwrap();
                    let want = step["loss"].as_f64().unwrap();
                    let what = format!("{} step {} {dtype:?}", path.display(), step["step"]);
                    let rel = (got - want).abs() / want.abs().max(1.0);
                    let k = usize::from(dtype == DType::F64);
                    worst[k] = worst[k].max(rel);
                    assert!(rel < 2e-6, "{what}: loss {got} vs {want}");
                    for (name, got) in reward_metrics(p.beta, &x).unwrap().named() {
                        let want = step[name].as_f64().unwrap();
                        assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{what}: {name} {got} vs {want}");
                    }
                }
            }
        }
        println!("trajectory losses: max rel err f32 {:.2e}, f64 {:.2e}", worst[0], worst[1]);
    }

    #[test]
    fn reward_metrics_without_reference_use_log_probs() {
        let fx = fixture();
        let inputs = Inputs::new(&fx, DType::F64);
        let mut x = inputs.pairs();
        x.ref_chosen = None;
        x.ref_rejected = None;
        let m = reward_metrics(2.0, &x).unwrap();
        assert!((m.chosen - 2.0 * -2.75).abs() < 1e-12);
        assert!((m.rejected - 2.0 * -4.25).abs() < 1e-12);
        assert!((m.margins - 3.0).abs() < 1e-12);
        assert_eq!(m.accuracies, 1.0);
        x.ref_chosen = Some(&inputs.t[2]);
        assert!(matches!(reward_metrics(2.0, &x), Err(LossError::MissingReference { .. })));
    }

    fn params_for(kind: LossType) -> LossParams {
        let mut p = LossParams { label_smoothing: 0.1, simpo_gamma: 1.375, ..LossParams::default() };
        if kind == LossType::Simpo {
            p.beta = 2.5;
        }
        p
    }

    /// Gradient of the batch-mean loss w.r.t. the policy's chosen and rejected log-probs.
    fn grads(kind: LossType, p: &LossParams, inputs: &Inputs) -> (Vec<f64>, Vec<f64>) {
        let w = Var::from_tensor(&inputs.t[0]).unwrap();
        let l = Var::from_tensor(&inputs.t[1]).unwrap();
        let mut x = inputs.pairs();
        x.chosen = w.as_tensor();
        x.rejected = l.as_tensor();
        let g = pair_loss(kind, p, &x).unwrap().mean_all().unwrap().backward().unwrap();
        let get = |v: &Var| match g.get(v.as_tensor()) {
            Some(t) => t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap(),
            None => vec![0.0; 4], // the loss does not depend on it (sft and rejected)
        };
        (get(&w), get(&l))
    }

    #[test]
    fn gradients_are_finite_and_push_chosen_up_rejected_down() {
        let fx = fixture();
        for dtype in [DType::F32, DType::F64] {
            let inputs = Inputs::new(&fx, dtype);
            for kind in LossType::PAIR_LOSSES {
                let (gw, gl) = grads(kind, &params_for(kind), &inputs);
                assert!(gw.iter().chain(&gl).all(|g| g.is_finite()), "{kind}: {gw:?} {gl:?}");
                // Gradient descent raises lp(y_w): d loss / d lp_w < 0 for every loss here.
                assert!(gw.iter().all(|&g| g < 0.0), "{kind} chosen: {gw:?}");
                match kind {
                    LossType::Sft => assert!(gl.iter().all(|&g| g == 0.0), "sft rejected: {gl:?}"),
                    // Soft SPPO pulls rho_l toward (p_l - 0.5)/beta, from either side.
                    LossType::Sppo => {
                        let rho_l = [-1.8, -0.8, -1.8, -0.7];
                        let target = [-2.0, -0.5, -3.0, 0.0];
                        for i in 0..4 {
                            assert_eq!(gl[i] > 0.0, rho_l[i] > target[i], "sppo rejected {i}: {gl:?}");
                        }
                    }
                    _ => assert!(gl.iter().all(|&g| g > 0.0), "{kind} rejected: {gl:?}"),
                }
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences_in_f64() {
        let fx = fixture();
        let inputs = Inputs::new(&fx, DType::F64);
        let mean_at = |kind: LossType, p: &LossParams, side: usize, i: usize, d: f64| {
            let mut v = inputs.t[side].to_vec1::<f64>().unwrap();
            v[i] += d;
            let moved = Tensor::new(v, &Device::Cpu).unwrap();
            let mut x = inputs.pairs();
            if side == 0 {
                x.chosen = &moved;
            } else {
                x.rejected = &moved;
            }
            pair_loss(kind, p, &x).unwrap().mean_all().unwrap().to_scalar::<f64>().unwrap()
        };
        for kind in LossType::PAIR_LOSSES {
            for sft_norm in [SftNorm::PerPair, SftNorm::TokenMean] {
                let p = LossParams { sft_norm, ..params_for(kind) };
                let (gw, gl) = grads(kind, &p, &inputs);
                for (side, g) in [(0, &gw), (1, &gl)] {
                    for (i, &gi) in g.iter().enumerate() {
                        let h = 1e-6;
                        let fd = (mean_at(kind, &p, side, i, h) - mean_at(kind, &p, side, i, -h)) / (2.0 * h);
                        assert!(
                            (fd - gi).abs() < 1e-6 * (1.0 + fd.abs()),
                            "{kind} side {side} pair {i}: {gi} vs fd {fd}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn dpo_gradient_at_policy_equals_reference_is_beta_over_2b() {
        // h = 0 exactly: logsig'(0) = 0.5, so d mean / d lp_w = -beta * 0.5 / B.
        let lp = Tensor::new(&[-3.0f32, -2.0, -7.5], &Device::Cpu).unwrap();
        let lens = Tensor::new(&[3.0f32, 2.0, 5.0], &Device::Cpu).unwrap();
        let w = Var::from_tensor(&lp).unwrap();
        let l = Var::from_tensor(&lp).unwrap();
        let x = PairLogps {
            chosen: w.as_tensor(),
            rejected: l.as_tensor(),
            ref_chosen: Some(&lp),
            ref_rejected: Some(&lp),
            chosen_lens: &lens,
            rejected_lens: &lens,
            win_prob_chosen: None,
            win_prob_rejected: None,
        };
        let loss = pair_loss(LossType::Sigmoid, &LossParams::default(), &x).unwrap().mean_all().unwrap();
        assert!((loss.to_scalar::<f32>().unwrap() - std::f32::consts::LN_2).abs() < 1e-7);
        let g = loss.backward().unwrap();
        for v in g.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap() {
            assert!((v - (-0.1 * 0.5 / 3.0)).abs() < 1e-8, "{v}");
        }
        for v in g.get(l.as_tensor()).unwrap().to_vec1::<f32>().unwrap() {
            assert!((v - (0.1 * 0.5 / 3.0)).abs() < 1e-8, "{v}");
        }
    }

    #[test]
    fn log_sigmoid_is_stable_for_large_arguments() {
        let z = Var::new(&[-1e4f32, -50.0, 0.0, 50.0, 1e4], &Device::Cpu).unwrap();
        let y = log_sigmoid(z.as_tensor()).unwrap();
        let v = y.to_vec1::<f32>().unwrap();
        assert_eq!(v[0], -1e4);
        assert!((v[1] + 50.0).abs() < 1e-5 && (v[2] + std::f32::consts::LN_2).abs() < 1e-7);
        assert!(v[3] <= 0.0 && v[3] > -1e-20 && v[4] == 0.0);
        let g = y.sum_all().unwrap().backward().unwrap();
        let g = g.get(z.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let want = [1.0, 1.0, 0.5, 0.0, 0.0]; // sigmoid(-z)
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{g:?}");
        }
    }

    #[test]
    fn hinge_has_no_gradient_past_the_margin() {
        let fx = fixture();
        let inputs = Inputs::new(&fx, DType::F64);
        let p = LossParams { beta: 1.0, ..LossParams::default() }; // beta*h >= 1 for pairs 0 and 2
        let (gw, gl) = grads(LossType::Hinge, &p, &inputs);
        assert_eq!((gw[0], gl[0], gw[2], gl[2]), (0.0, 0.0, 0.0, 0.0));
        assert!(gw[1] < 0.0 && gl[1] > 0.0);
    }

    #[test]
    fn combined_sigmoid_plus_sft_is_the_sum_of_means() {
        let fx = fixture();
        let inputs = Inputs::new(&fx, DType::F64);
        let x = inputs.pairs();
        let p = LossParams::default();
        let mean = |k| pair_loss(k, &p, &x).unwrap().mean_all().unwrap().to_scalar::<f64>().unwrap();
        let both = combined_loss(&[(LossType::Sigmoid, 1.0), (LossType::Sft, 1.0)], &p, &x).unwrap();
        assert_eq!(both.rank(), 0);
        let both = both.to_scalar::<f64>().unwrap();
        assert!((both - (mean(LossType::Sigmoid) + mean(LossType::Sft))).abs() < 1e-12);
        let weighted = combined_loss(&[(LossType::Sigmoid, 1.0), (LossType::Sft, 0.25)], &p, &x).unwrap();
        let weighted = weighted.to_scalar::<f64>().unwrap();
        assert!((weighted - (mean(LossType::Sigmoid) + 0.25 * mean(LossType::Sft))).abs() < 1e-12);
        assert!(matches!(combined_loss(&[], &p, &x), Err(LossError::NoTerms)));
    }

    /// `cpo` and `rdpo` against their formulas (methods.md section 2), computed here in plain
    /// f64 arithmetic: CPO = cDPO on lp_w - lp_l plus cpo_alpha * NLL(y_w) (TRL's
    /// `CPOTrainer` with `loss_type="sigmoid"`), R-DPO = DPO with `-rdpo_alpha (|y_w| - |y_l|)`.
    #[test]
    fn cpo_and_rdpo_match_their_formulas() {
        let dev = candle_core::Device::Cpu;
        let t = |v: &[f64]| Tensor::new(v, &dev).unwrap();
        let (lp_w, lp_l, ref_w, ref_l, n_w, n_l) =
            ([-12.0, -30.5], [-15.0, -22.0], [-13.0, -29.0], [-14.0, -23.5], [6.0, 20.0], [9.0, 11.0]);
        let (cw, cl, rw, rl, nw, nl) = (t(&lp_w), t(&lp_l), t(&ref_w), t(&ref_l), t(&n_w), t(&n_l));
        let x = PairLogps {
            chosen: &cw,
            rejected: &cl,
            ref_chosen: Some(&rw),
            ref_rejected: Some(&rl),
            chosen_lens: &nw,
            rejected_lens: &nl,
            win_prob_chosen: None,
            win_prob_rejected: None,
        };
        let logsig = |z: f64| -(1.0 + (-z).exp()).ln();
        let p =
            LossParams { beta: 0.2, label_smoothing: 0.1, cpo_alpha: 0.7, rdpo_alpha: 0.05, ..LossParams::default() };
        let cpo: Vec<f64> = pair_loss(LossType::Cpo, &p, &x).unwrap().to_vec1().unwrap();
        let rdpo: Vec<f64> = pair_loss(LossType::Rdpo, &p, &x).unwrap().to_vec1().unwrap();
        for i in 0..2 {
            let z = p.beta * (lp_w[i] - lp_l[i]);
            let want = -(1.0 - p.label_smoothing) * logsig(z) - p.label_smoothing * logsig(-z)
                + p.cpo_alpha * (-lp_w[i] / n_w[i]);
            assert!((cpo[i] - want).abs() < 1e-12, "cpo {i}: {} vs {want}", cpo[i]);
            let h = (lp_w[i] - ref_w[i]) - (lp_l[i] - ref_l[i]);
            let want = -logsig(p.beta * h - p.rdpo_alpha * (n_w[i] - n_l[i]));
            assert!((rdpo[i] - want).abs() < 1e-12, "rdpo {i}: {} vs {want}", rdpo[i]);
        }
        // rdpo_alpha = 0 is DPO; cpo runs without a reference.
        let dpo: Vec<f64> = pair_loss(LossType::Sigmoid, &LossParams { beta: 0.2, ..LossParams::default() }, &x)
            .unwrap()
            .to_vec1()
            .unwrap();
        let r0: Vec<f64> =
            pair_loss(LossType::Rdpo, &LossParams { beta: 0.2, rdpo_alpha: 0.0, ..LossParams::default() }, &x)
                .unwrap()
                .to_vec1()
                .unwrap();
        assert_eq!(dpo, r0);
        let free = PairLogps { ref_chosen: None, ref_rejected: None, ..x };
        assert!(pair_loss(LossType::Cpo, &p, &free).is_ok());
        assert!(pair_loss(LossType::Rdpo, &p, &free).is_err());
    }

    #[test]
    fn reference_free_losses_run_without_reference_and_the_others_refuse() {
        let fx = fixture();
        let inputs = Inputs::new(&fx, DType::F32);
        let mut x = inputs.pairs();
        x.ref_chosen = None;
        x.ref_rejected = None;
        for kind in LossType::PAIR_LOSSES {
            let p = params_for(kind);
            match pair_loss(kind, &p, &x) {
                Ok(_) => assert!(!kind.needs_reference(), "{kind}"),
                Err(e) => {
                    assert!(kind.needs_reference(), "{kind}: {e}");
                    assert_eq!(
                        e.to_string(),
                        format!("loss `{kind}` needs reference log-probs (`ref_chosen` and `ref_rejected`)")
                    );
                }
            }
        }
        let mut x = inputs.pairs();
        x.win_prob_rejected = None;
        let e = pair_loss(LossType::Sppo, &LossParams::default(), &x).unwrap_err();
        assert!(matches!(e, LossError::MissingWinProbs { loss: "sppo" }), "{e}");
    }

    #[test]
    fn bad_parameters_are_errors() {
        let fx = fixture();
        let inputs = Inputs::new(&fx, DType::F32);
        let x = inputs.pairs();
        let robust = LossParams { label_smoothing: 0.6, ..LossParams::default() };
        let e = pair_loss(LossType::Robust, &robust, &x).unwrap_err();
        assert_eq!(e.to_string(), "label_smoothing must be < 0.5 for `robust`, got 0.6");
        let half = LossParams { label_smoothing: 0.5, ..LossParams::default() };
        assert!(pair_loss(LossType::Robust, &half, &x).is_err());
        assert!(pair_loss(LossType::Sigmoid, &half, &x).is_ok());
        assert!(pair_loss(LossType::Sigmoid, &robust, &x).is_err());
        for beta in [0.0, -0.1, f64::NAN] {
            let p = LossParams { beta, ..LossParams::default() };
            for kind in LossType::PAIR_LOSSES {
                let r = pair_loss(kind, &p, &x);
                assert_eq!(r.is_ok(), kind == LossType::Sft, "{kind} beta {beta}");
            }
        }
        let e = pair_loss(LossType::Ipo, &LossParams { beta: 0.0, ..LossParams::default() }, &x).unwrap_err();
        assert_eq!(e.to_string(), "beta must be > 0 for `ipo`, got 0");
        let p = LossParams { dpop_lambda: -1.0, ..LossParams::default() };
        assert!(pair_loss(LossType::Dpop, &p, &x).is_err());
        let e = combined_loss(&[(LossType::Sigmoid, f64::INFINITY)], &LossParams::default(), &x).unwrap_err();
        assert!(e.to_string().contains("loss weight"), "{e}");
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        let fx = fixture();
        let inputs = Inputs::new(&fx, DType::F32);
        let short = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let mut x = inputs.pairs();
        x.rejected_lens = &short;
        let e = pair_loss(LossType::Ipo, &LossParams::default(), &x).unwrap_err();
        assert_eq!(e.to_string(), "`rejected_lens` has shape [2], expected (4,) like `chosen`");
        let wide = inputs.t[3].to_dtype(DType::F64).unwrap();
        let mut x = inputs.pairs();
        x.ref_rejected = Some(&wide);
        assert!(matches!(pair_loss(LossType::Sigmoid, &LossParams::default(), &x), Err(LossError::DType { .. })));
    }

    #[test]
    fn empty_completions_do_not_give_nan() {
        let lp = Tensor::new(&[0.0f32, -2.0], &Device::Cpu).unwrap();
        let lens = Tensor::new(&[0.0f32, 2.0], &Device::Cpu).unwrap();
        let x = PairLogps {
            chosen: &lp,
            rejected: &lp,
            ref_chosen: Some(&lp),
            ref_rejected: Some(&lp),
            chosen_lens: &lens,
            rejected_lens: &lens,
            win_prob_chosen: None,
            win_prob_rejected: None,
        };
        for kind in [LossType::Ipo, LossType::Simpo, LossType::Sft] {
            for sft_norm in [SftNorm::PerPair, SftNorm::TokenMean] {
                let p = LossParams { sft_norm, ..LossParams::default() };
                let v = pair_loss(kind, &p, &x).unwrap().to_vec1::<f32>().unwrap();
                assert!(v.iter().all(|v| v.is_finite()), "{kind}: {v:?}");
            }
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_list_the_valid_ones() {
        for kind in LossType::PAIR_LOSSES {
            assert_eq!(LossType::parse(kind.name()), Ok(kind));
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.name()));
            assert_eq!(serde_json::from_str::<LossType>(&json).unwrap(), kind);
        }
        let e = LossType::parse("dpo").unwrap_err();
        assert!(e.contains("`dpo`") && e.contains("sigmoid") && e.contains("sppo_hard") && e.contains("sft"), "{e}");
        assert_eq!(serde_json::to_string(&SftNorm::TokenMean).unwrap(), "\"token_mean\"");
    }
}
