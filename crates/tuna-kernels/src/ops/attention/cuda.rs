//! Fused attention on CUDA: launch glue for `kernels/attention.cu` (shared-memory-tiled SIMT
//! FlashAttention-2 forward; backward as delta preprocess, key-block main kernel, dq add), for
//! every head dim up to 256 on the tile widths of [`TILE_WIDTHS`]) and `kernels/attention_tc.cu`
//! (the tensor-core forward for bf16 at head dims [`TC_HEAD_DIMS`]) and
//! `kernels/attention_tc_bwd.cu` (the tensor-core backward's main kernel, same head dims). A bf16
//! forward the tensor-core kernel covers runs there, every other forward on the SIMT kernel; the
//! path the last forward of the calling thread took is [`last_fwd_path`]. Likewise the backward's
//! main (key-block) kernel, [`tc_bwd_refusal`] and [`last_bwd_path`]; its delta preprocess and dq
//! add are attention.cu's on both paths.

use super::self_check::{self, Verdict};
use super::{check_bwd, check_inputs, AttentionKernel, AttnGrads, AttnInputs, AttnParams};
use crate::backend::{Backend, Elem};
use crate::cuda::{grid_1d, symbol, Cuda, CudaElem};
use crate::cuda::{CudaBuf, KernelArg, Launch};
use crate::error::{Error, Result};
use cudarc::driver::LaunchConfig;

// SAFETY: #[repr(C)] plain-old-data (twelve u32 and one f32), mirrored field by field by
// `struct AttnParams` in attention.cu.
unsafe impl KernelArg for AttnParams {}

/// Rows per tile (queries and keys) and threads per block, as `ATTN_TILE` and 8 warps in the .cu.
const TILE: usize = 32;
const THREADS: u32 = 256;
/// Largest grid y/z dimension (heads and kv_heads ride y, batch rides z).
const MAX_GRID_Z: u32 = 65535;

/// Tile widths with compiled kernels (`attention_<dir>_d<W>_<dtype>`); each is its own launch
/// configuration (template instance). A head dim runs on the smallest width that holds it, its
/// columns zero-padded in shared memory (80 on 96, 4 on 32).
pub const TILE_WIDTHS: [u32; 6] = [32, 64, 96, 128, 192, 256];

/// The tile width a head dim runs on, `None` above the largest.
pub fn tile_width(head_dim: u32) -> Option<u32> {
    TILE_WIDTHS.iter().copied().find(|&w| head_dim <= w)
}

/// Dynamic shared bytes of the forward at tile width `w`: Qs[32][w], Ks[32][w+1], Vs[32][w] in f32.
pub fn fwd_smem_bytes(w: usize) -> u32 {
    (4 * TILE * (3 * w + 1)) as u32
}

/// Dynamic shared bytes of the main backward at tile width `w`: Ks, Vs, Qs, dOs [32][w+1], Ps, dSs
/// [32][33], lse and delta [32], in f32.
pub fn bwd_smem_bytes(w: usize) -> u32 {
    (4 * (4 * TILE * (w + 1) + 2 * TILE * (TILE + 1) + 2 * TILE)) as u32
}

/// Head dims with a tensor-core forward (`attention_tc_fwd_d<D>_bf16`): exactly these, no padding.
pub const TC_HEAD_DIMS: [u32; 3] = [32, 64, 128];
/// Query rows per block and threads per block of the tensor-core forward (4 warps x 16 rows).
const TC_ROWS: usize = 64;
const TC_THREADS: u32 = 128;

/// Dynamic shared bytes of the tensor-core forward at head dim `d`: Q [64][d+8] and two buffers
/// each of K and V [64][d+8], in bf16.
pub fn tc_fwd_smem_bytes(d: usize) -> u32 {
    (2 * 5 * TC_ROWS * (d + 8)) as u32
}

/// Query rows per query tile and keys per block of the tensor-core backward (4 warps x 16 keys).
const TC_BWD_KEYS: usize = 64;

/// Dynamic shared bytes of the tensor-core backward at head dim `d`: K, V [64][d+8] and two
/// buffers each of Q and dO [64][d+8], dS^T [64][72], in bf16; two buffers each of lse and delta
/// [64] in f32.
pub fn tc_bwd_smem_bytes(d: usize) -> u32 {
    (2 * (6 * TC_BWD_KEYS * (d + 8) + TC_BWD_KEYS * 72) + 4 * 4 * TC_BWD_KEYS) as u32
}

/// Which kernel a CUDA attention forward (or the backward's main kernel) ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FwdPath {
    /// `kernels/attention_tc.cu` (`attention_tc_bwd.cu` for the backward): bf16 mma.sync with
    /// ldmatrix and cp.async.
    TensorCore,
    /// `kernels/attention.cu`'s SIMT kernel, and why the tensor-core kernel did not take the call.
    Simt(&'static str),
}

/// The backward's path: the same two kernels' kinds as the forward's.
pub type BwdPath = FwdPath;

impl std::fmt::Display for FwdPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FwdPath::TensorCore => f.write_str("tensor cores (mma.sync bf16)"),
            FwdPath::Simt(why) => write!(f, "SIMT ({why})"),
        }
    }
}

thread_local! {
    static LAST_FWD: std::cell::Cell<Option<FwdPath>> = const { std::cell::Cell::new(None) };
    static LAST_BWD: std::cell::Cell<Option<BwdPath>> = const { std::cell::Cell::new(None) };
    static FORCE_SIMT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Keep this thread's attention calls on the SIMT kernels (`on`), as a device the tensor-core
/// kernels do not cover would (sm_86/89 at head dim 128: too little shared memory). For tests: the
/// emulated device (sm_90, 227 KiB) would otherwise never launch the SIMT bf16 kernels those
/// devices run.
pub fn force_simt(on: bool) {
    FORCE_SIMT.with(|c| c.set(on));
}

/// Whether [`force_simt`] is on for this thread.
pub fn simt_forced() -> bool {
    FORCE_SIMT.with(|c| c.get())
}

/// Set what [`last_fwd_path`] and [`last_bwd_path`] report (the device check puts back the
/// caller's after its own calls).
pub(super) fn set_last_paths(fwd: Option<FwdPath>, bwd: Option<BwdPath>) {
    LAST_FWD.with(|c| c.set(fwd));
    LAST_BWD.with(|c| c.set(bwd));
}

/// The path the last CUDA attention forward launched from this thread took (`None` before the
/// first). Launches are synchronous with the calling thread's op, so a test or a profiler reads
/// it right after the call.
pub fn last_fwd_path() -> Option<FwdPath> {
    LAST_FWD.with(|c| c.get())
}

/// Whether the tensor-core forward takes this bf16 call, else why not (shape and features; the
/// buffers' alignment is checked at launch).
pub fn tc_fwd_refusal(dev: &Cuda, p: &AttnParams) -> Option<&'static str> {
    tc_refusal(dev, p, tc_fwd_smem_bytes(p.head_dim as usize))
}

/// Why a tensor-core kernel needing `smem` bytes of shared memory does not take a bf16 call with
/// `p` on `dev`, if it does not.
fn tc_refusal(dev: &Cuda, p: &AttnParams, smem: u32) -> Option<&'static str> {
    if dev.arch() < 80 {
        Some("mma.sync bf16 needs sm_80 or newer")
    } else if !TC_HEAD_DIMS.contains(&p.head_dim) {
        Some("head_dim not 32, 64 or 128")
    } else if smem > dev.max_dyn_smem() {
        Some("shared memory")
    } else {
        None
    }
}

/// The path the last CUDA attention backward launched from this thread took for its main kernel
/// (`None` before the first), as [`last_fwd_path`] for the forward.
pub fn last_bwd_path() -> Option<BwdPath> {
    LAST_BWD.with(|c| c.get())
}

/// Whether the tensor-core backward takes this bf16 call, else why not (shape and features; the
/// buffers' alignment is checked at launch). It covers what the SIMT backward does at these head
/// dims: causal or not, mask, GQA, prefix (table or per-sequence ranges), KV offset, score bias.
pub fn tc_bwd_refusal(dev: &Cuda, p: &AttnParams) -> Option<&'static str> {
    tc_refusal(dev, p, tc_bwd_smem_bytes(p.head_dim as usize))
}

/// The tile width for `p`; head dims above the largest width, and batches beyond the grid's z
/// limit, are unsupported here.
fn check_supported(dev: &Cuda, p: &AttnParams) -> Result<u32> {
    let unsupported = |msg: String| Err(Error::Unsupported { op: "attention", device: dev.device_name(), msg });
    let Some(w) = tile_width(p.head_dim) else {
        let max = TILE_WIDTHS[TILE_WIDTHS.len() - 1];
        return unsupported(format!("head_dim {} has no CUDA kernel (at most {max})", p.head_dim));
    };
    if p.batch > MAX_GRID_Z || p.heads > MAX_GRID_Z {
        return unsupported(format!("batch {} or heads {} exceeds the grid limit {MAX_GRID_Z}", p.batch, p.heads));
    }
    // The backward's tiles are the larger; refusing both keeps a forward from running whose
    // backward cannot (sm_86/89 allow 99 KiB a block: head dims up to 128 there).
    let need = bwd_smem_bytes(w as usize).max(fwd_smem_bytes(w as usize));
    if need > dev.max_dyn_smem() {
        let msg = format!(
            "head_dim {} needs {need} B of shared memory per block (tile width {w}); this device allows {}",
            p.head_dim,
            dev.max_dyn_smem()
        );
        return unsupported(msg);
    }
    Ok(w)
}

/// The kernel `attention_<dir>_d<W>_<dtype>` of tile width `w`.
fn tiled<'a, E: Elem>(dir: &str, w: u32) -> Launch<'a> {
    Launch::new("attention", symbol::<E>("attention", &format!("{dir}_d{w}")))
}

/// 256 threads per block over a 3-D grid `(x, y, z)` with `smem` dynamic shared bytes.
fn grid3(x: usize, y: u32, z: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (x as u32, y, z), block_dim: (THREADS, 1, 1), shared_mem_bytes: smem }
}

/// The key mask, or a 1-element stand-in (never read: `has_mask` is 0) kept alive in `slot`.
fn mask_or_dummy<'a>(
    dev: &Cuda,
    mask: Option<&'a CudaBuf<u8>>,
    slot: &'a mut Option<CudaBuf<u8>>,
) -> Result<&'a CudaBuf<u8>> {
    Ok(match mask {
        Some(m) => m,
        None => slot.insert(dev.zeros::<u8>(1)?),
    })
}

/// The per-sequence prefix ranges, or a 1-element stand-in (never read: `has_prefix_rows` is 0)
/// kept alive in `slot`.
fn rows_or_dummy<'a>(
    dev: &Cuda,
    rows: Option<&'a CudaBuf<u32>>,
    slot: &'a mut Option<CudaBuf<u32>>,
) -> Result<&'a CudaBuf<u32>> {
    Ok(match rows {
        Some(r) => r,
        None => slot.insert(dev.zeros::<u32>(1)?),
    })
}

/// The prefix keys and values, or the queries standing in for them (never read: `prefix_len` is 0).
fn prefix_or<'a, E: Elem>(x: &AttnInputs<'a, Cuda, E>) -> (&'a CudaBuf<E>, &'a CudaBuf<E>) {
    x.prefix.unwrap_or((x.q, x.q))
}

impl Cuda {
    /// The kernels a call with `p` on `E`s takes, forward and backward, before the launch-time
    /// alignment check.
    fn planned<E: Elem>(&self, p: &AttnParams) -> (FwdPath, BwdPath) {
        let forced = FORCE_SIMT.with(|c| c.get());
        let failed = matches!(self.attention_checked(), Some(Verdict::Simt { .. }));
        let path = |refusal: Option<&'static str>| match (E::NAME, refusal) {
            ("bf16", None) if forced => FwdPath::Simt("forced (ops::attention::force_simt)"),
            ("bf16", None) if failed => FwdPath::Simt("the tensor-core kernels failed this device's check"),
            ("bf16", None) => FwdPath::TensorCore,
            ("bf16", Some(why)) => FwdPath::Simt(why),
            _ => FwdPath::Simt("f32 elements"),
        };
        (path(tc_fwd_refusal(self, p)), path(tc_bwd_refusal(self, p)))
    }

    /// The kernels a call with `p` takes after the device's attention check ([`Cuda::attention_check`]),
    /// which the first call that would take the tensor cores runs (`fwd`: this call's direction is
    /// the forward); an error where the check refused attention on this device.
    fn checked_plan<E: Elem>(&self, p: &AttnParams, fwd: bool) -> Result<(FwdPath, BwdPath)> {
        // (`attention_checked` is `None` while this thread runs the check: its calls pass.)
        if !self_check::in_check() && self.attention_checked().is_none() {
            let (f, b) = self.planned::<E>(p);
            if if fwd { f } else { b } == FwdPath::TensorCore {
                self.attention_check()?;
            }
        }
        if let Some(Verdict::Refused { why }) = self.attention_checked() {
            return Err(self_check::refused(self, why));
        }
        Ok(self.planned::<E>(p))
    }
}

impl<E: CudaElem> AttentionKernel<E> for Cuda {
    fn attn_paths(&self, p: &AttnParams) -> Option<(FwdPath, BwdPath)> {
        Some(self.planned::<E>(p))
    }

    fn attn_fwd(
        &self,
        p: &AttnParams,
        x: AttnInputs<'_, Self, E>,
        o: &mut CudaBuf<E>,
        lse: &mut CudaBuf<f32>,
    ) -> Result<()> {
        check_inputs(p, &x)?;
        let shape = || format!("{p:?}");
        crate::error::check_len("attention", "o", o.len(), p.q_elems(), shape)?;
        crate::error::check_len("attention", "lse", lse.len(), p.lse_elems(), shape)?;
        let w = check_supported(self, p)?;
        if p.lse_elems() == 0 {
            return Ok(());
        }
        let (mut path, _) = self.checked_plan::<E>(p, true)?;
        let (pk, pv) = prefix_or(&x);
        if path == FwdPath::TensorCore && ![x.q, x.k, x.v, pk, pv, &*o].iter().all(|b| b.aligned16()) {
            path = FwdPath::Simt("buffers not 16-byte aligned");
        }
        LAST_FWD.with(|c| c.set(Some(path)));
        if path == FwdPath::TensorCore {
            return self.launch_fwd_tc(p, x, o, lse);
        }
        let smem = fwd_smem_bytes(w as usize);
        let mut dummy_mask = None;
        let mask = mask_or_dummy(self, x.key_mask, &mut dummy_mask)?;
        let mut dummy_rows = None;
        let rows = rows_or_dummy(self, x.prefix_rows, &mut dummy_rows)?;
        let bias = x.bias.unwrap_or(x.q);
        let cfg = grid3((p.q_len as usize).div_ceil(TILE), p.heads, p.batch, smem);
        let mut b = tiled::<E>("fwd", w);
        b.arg(p).arg(x.q).arg(x.k).arg(x.v).arg(pk).arg(pv).arg(rows).arg(mask).arg(bias).arg(o).arg(lse);
        // SAFETY: the arguments match attention_fwd_d<D>_<E>(AttnParams, q, k, v, pk, pv, prows,
        // mask, bias, o, lse); every length was checked against `p` above, absent
        // prefix/ranges/mask/bias are never read (prefix_len 0, has_prefix_rows 0, has_mask 0,
        // has_bias 0: q stands in for the bias), the kernel clamps each range to the table, and
        // `smem` is what the kernel's shared tiles need.
        unsafe { self.launch(b, cfg) }?;
        Ok(())
    }

    fn attn_bwd(
        &self,
        p: &AttnParams,
        x: AttnInputs<'_, Self, E>,
        o: &CudaBuf<E>,
        d_o: &CudaBuf<E>,
        lse: &CudaBuf<f32>,
        g: AttnGrads<'_, Self, E>,
    ) -> Result<()> {
        check_inputs(p, &x)?;
        check_bwd(p, o, d_o, lse, &g)?;
        let w = check_supported(self, p)?;
        if p.q_elems() == 0 {
            return Ok(()); // no query, no gradient: nothing to add
        }
        let (_, mut path) = self.checked_plan::<E>(p, false)?;
        let (pk, pv) = prefix_or(&x);
        if path == BwdPath::TensorCore && ![x.q, x.k, x.v, pk, pv, d_o].iter().all(|b| b.aligned16()) {
            path = BwdPath::Simt("buffers not 16-byte aligned");
        }
        LAST_BWD.with(|c| c.set(Some(path)));
        let mut delta = self.zeros::<f32>(p.lse_elems())?;
        self.launch_bwd_pre::<E>(p, o, d_o, &mut delta)?;
        let mut dq_acc = self.zeros::<f32>(p.q_elems())?;
        let main = BwdMain { dq_acc: &mut dq_acc, dk: g.dk, dv: g.dv, dprefix: g.dprefix, dbias: g.dbias };
        let kernel = match path {
            BwdPath::TensorCore => BwdKernel::TensorCore,
            BwdPath::Simt(_) => BwdKernel::Simt(w),
        };
        self.launch_bwd_main(p, kernel, x, d_o, lse, &delta, main)?;
        let n = p.q_elems() as u64;
        let mut b = Launch::new("attention", symbol::<E>("attention", "dq_add"));
        b.arg(&n).arg(&dq_acc).arg(g.dq);
        // SAFETY: matches attention_dq_add_<E>(u64 n, const float*, T*); both buffers hold n
        // elements (dq checked by check_bwd, dq_acc allocated with q_elems).
        unsafe { self.launch(b, grid_1d(p.q_elems(), THREADS)) }?;
        Ok(())
    }
}

/// The main backward kernel to launch: the tensor-core one (bf16, head dim one of
/// [`TC_HEAD_DIMS`], 16-byte-aligned buffers) or the SIMT one of tile width `w`.
#[derive(Clone, Copy)]
enum BwdKernel {
    TensorCore,
    Simt(u32),
}

/// The buffers the main backward kernel accumulates into.
struct BwdMain<'a, E: CudaElem> {
    dq_acc: &'a mut CudaBuf<f32>,
    dk: &'a mut CudaBuf<E>,
    dv: &'a mut CudaBuf<E>,
    dprefix: Option<(&'a mut CudaBuf<f32>, &'a mut CudaBuf<f32>)>,
    dbias: Option<&'a mut CudaBuf<f32>>,
}

impl Cuda {
    /// The tensor-core forward (`attention_tc_fwd_d<D>_bf16`) of a call [`tc_fwd_refusal`]
    /// accepted, with 16-byte-aligned buffers.
    fn launch_fwd_tc<E: CudaElem>(
        &self,
        p: &AttnParams,
        x: AttnInputs<'_, Self, E>,
        o: &mut CudaBuf<E>,
        lse: &mut CudaBuf<f32>,
    ) -> Result<()> {
        debug_assert_eq!(E::NAME, "bf16");
        let mut dummy_mask = None;
        let mask = mask_or_dummy(self, x.key_mask, &mut dummy_mask)?;
        let mut dummy_rows = None;
        let rows = rows_or_dummy(self, x.prefix_rows, &mut dummy_rows)?;
        let (pk, pv) = prefix_or(&x);
        let smem = tc_fwd_smem_bytes(p.head_dim as usize);
        let cfg = LaunchConfig {
            grid_dim: ((p.q_len as usize).div_ceil(TC_ROWS) as u32, p.heads, p.batch),
            block_dim: (TC_THREADS, 1, 1),
            shared_mem_bytes: smem,
        };
        let mut b = Launch::new("attention_tc", format!("attention_tc_fwd_d{}_bf16", p.head_dim));
        let bias = x.bias.unwrap_or(x.q);
        b.arg(p).arg(x.q).arg(x.k).arg(x.v).arg(pk).arg(pv).arg(rows).arg(mask).arg(bias).arg(o).arg(lse);
        // SAFETY: the arguments match attention_tc_fwd_d<D>_bf16(AttnParams, q, k, v, pk, pv, prows,
        // mask, bias, o, lse) with E = bf16 (the caller's check) and D = head_dim (one of TC_HEAD_DIMS);
        // lengths were checked against `p` by attn_fwd, the buffers are 16-byte aligned (checked),
        // absent prefix/ranges/mask/bias are never read (prefix_len 0, has_prefix_rows 0, has_mask 0,
        // has_bias 0: q stands in for the bias), and `smem` is what the kernel's shared tiles need.
        unsafe { self.launch(b, cfg) }?;
        Ok(())
    }

    /// delta[b,h,i] = sum_d dO * O, one warp per query row.
    fn launch_bwd_pre<E: CudaElem>(
        &self,
        p: &AttnParams,
        o: &CudaBuf<E>,
        d_o: &CudaBuf<E>,
        delta: &mut CudaBuf<f32>,
    ) -> Result<()> {
        let warps_per_block = (THREADS / 32) as usize;
        let cfg = grid3(p.lse_elems().div_ceil(warps_per_block), 1, 1, 0);
        let mut b = Launch::new("attention", symbol::<E>("attention", "bwd_pre"));
        b.arg(p).arg(o).arg(d_o).arg(delta);
        // SAFETY: matches attention_bwd_pre_<E>(AttnParams, o, d_o, delta); o and d_o hold
        // q_elems, delta lse_elems (one per row; the kernel returns for rows past the end).
        unsafe { self.launch(b, cfg) }?;
        Ok(())
    }

    /// The key-block kernel (SIMT, or tensor-core for a call [`tc_bwd_refusal`] accepted with
    /// 16-byte-aligned buffers): dK, dV (or dpK, dpV) and dbias accumulated, dQ added into `dq_acc`.
    #[allow(clippy::too_many_arguments)]
    fn launch_bwd_main<E: CudaElem>(
        &self,
        p: &AttnParams,
        kernel: BwdKernel,
        x: AttnInputs<'_, Self, E>,
        d_o: &CudaBuf<E>,
        lse: &CudaBuf<f32>,
        delta: &CudaBuf<f32>,
        g: BwdMain<'_, E>,
    ) -> Result<()> {
        let mut dummy_mask = None;
        let mask = mask_or_dummy(self, x.key_mask, &mut dummy_mask)?;
        let (mut dummy_k, mut dummy_v);
        let (dpk, dpv) = match g.dprefix {
            Some(pair) => pair,
            None => {
                (dummy_k, dummy_v) = (self.zeros::<f32>(1)?, self.zeros::<f32>(1)?);
                (&mut dummy_k, &mut dummy_v)
            }
        };
        let mut dummy_dbias;
        let dbias = match g.dbias {
            Some(d) => d,
            None => {
                dummy_dbias = self.zeros::<f32>(1)?;
                &mut dummy_dbias
            }
        };
        let mut dummy_rows = None;
        let rows = rows_or_dummy(self, x.prefix_rows, &mut dummy_rows)?;
        let (pk, pv) = prefix_or(&x);
        let bias = x.bias.unwrap_or(x.q);
        let (cfg, mut b) = match kernel {
            BwdKernel::Simt(w) => {
                let blocks = (p.prefix_len as usize).div_ceil(TILE) + (p.kv_len as usize).div_ceil(TILE);
                (grid3(blocks, p.kv_heads, p.batch, bwd_smem_bytes(w as usize)), tiled::<E>("bwd", w))
            }
            BwdKernel::TensorCore => {
                debug_assert_eq!(E::NAME, "bf16");
                let blocks = (p.prefix_len as usize).div_ceil(TC_BWD_KEYS) + (p.kv_len as usize).div_ceil(TC_BWD_KEYS);
                let cfg = LaunchConfig {
                    grid_dim: (blocks as u32, p.kv_heads, p.batch),
                    block_dim: (TC_THREADS, 1, 1),
                    shared_mem_bytes: tc_bwd_smem_bytes(p.head_dim as usize),
                };
                (cfg, Launch::new("attention_tc_bwd", format!("attention_tc_bwd_d{}_bf16", p.head_dim)))
            }
        };
        b.arg(p).arg(x.q).arg(x.k).arg(x.v).arg(pk).arg(pv).arg(rows).arg(mask).arg(bias);
        b.arg(d_o).arg(lse).arg(delta).arg(g.dq_acc).arg(g.dk).arg(g.dv).arg(dpk).arg(dpv).arg(dbias);
        // SAFETY: matches attention_bwd_d<D>_<E> and attention_tc_bwd_d<D>_bf16 (AttnParams, q, k, v,
        // pk, pv, prows, mask, bias, d_o, lse, delta, dq_acc, dk, dv, dpk, dpv, dbias), the latter only
        // with E = bf16, D = head_dim one of TC_HEAD_DIMS and 16-byte-aligned q, k, v, pk, pv, d_o
        // (attn_bwd's checks); `smem` is what the chosen kernel's shared tiles need; lengths were checked by check_inputs/check_bwd
        // and the scratch buffers were allocated from `p`; absent prefix/mask/bias buffers are never
        // touched (no prefix block exists when prefix_len is 0; has_mask 0 skips the mask; has_bias 0
        // skips the bias and dbias).
        unsafe { self.launch(b, cfg) }?;
        Ok(())
    }
}
