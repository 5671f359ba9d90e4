//! Checkpoint reading: single or sharded safetensors (`model.safetensors.index.json`) by memory
//! map, F32 / BF16 / F16 / F8_E4M3 tensors, and exact dequantization of FP8 weights with their
//! 128x128 block `weight_scale_inv`. Every failure names the tensor and the shape it should have.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use super::ModelError;
use crate::backend::cpu::fp8::Fp8Weight;

/// Where the model's tensors come from: a checkpoint on disk, or generated weights for the
/// built-in demo model. Shapes are `[out, in]` for linears, as in the checkpoint.
pub trait TensorSource {
    /// The tensor as f32 (dequantized if stored as FP8), checked against `shape`.
    fn f32_tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError>;
    fn contains(&self, name: &str) -> bool;
    /// The tensor's E4M3 codes and block scales when it is stored in FP8, `None` otherwise.
    /// Call after [`TensorSource::f32_tensor`] of the same name, which checks the shapes.
    fn fp8_tensor(&self, _name: &str) -> Option<Fp8Weight> {
        None
    }
    /// Instead of [`TensorSource::f32_tensor`]: the codes and scales of an FP8 tensor, checked
    /// against `shape`, with no f32 copy; `Ok(None)` when the tensor is not stored in FP8.
    fn fp8_codes(&self, _name: &str, _shape: &[usize]) -> Result<Option<Fp8Weight>, ModelError> {
        Ok(None)
    }
}

/// Bytes of weights read so far and to be read, shared between a loader and whoever reports
/// on it (the log, the `deepseek_engine_model_load_progress` gauge).
#[derive(Debug, Default)]
pub struct LoadProgress {
    done: AtomicU64,
    total: AtomicU64,
}

impl LoadProgress {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    /// Sets how many bytes the load will read in all.
    pub fn set_total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
    }
    pub fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }
    /// (bytes read, bytes to read).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
    /// Share done, 0 to 1 (0 while the total is unknown).
    pub fn fraction(&self) -> f64 {
        let (done, total) = self.bytes();
        if total == 0 {
            0.0
        } else {
            (done as f64 / total as f64).min(1.0)
        }
    }
}

/// Where one tensor's bytes lie in its file, for readers that copy them elsewhere (a GPU)
/// without going through the memory map.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub name: String,
    pub path: PathBuf,
    /// Byte offset of the first element in the file.
    pub offset: u64,
    pub len: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
}

#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    entries: BTreeMap<String, Entry>,
    fp8_block: [usize; 2],
    consumed: Mutex<HashSet<String>>,
    /// Bytes of tensor data read so far, for load progress.
    loaded_bytes: Mutex<(u64, Instant)>,
    /// Bytes this load will read: the whole checkpoint unless narrowed with
    /// [`Checkpoint::expect_bytes`].
    total_bytes: u64,
    progress: Arc<LoadProgress>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.entries.len())
            .finish()
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors.index.json` with its shards, or `dir/model.safetensors`,
    /// or (failing both) every `*.safetensors` file in `dir`.
    pub fn open(dir: &Path, fp8_block: [usize; 2]) -> Result<Self, ModelError> {
        let index_path = dir.join("model.safetensors.index.json");
        let mut files: Vec<PathBuf> = Vec::new();
        let mut expected: Option<HashMap<String, String>> = None;
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::Io {
                path: index_path.clone(),
                source: e,
            })?;
            let index: ShardIndex =
                serde_json::from_str(&text).map_err(|e| ModelError::Checkpoint {
                    path: index_path.clone(),
                    message: format!("not a valid safetensors index: {e}"),
                })?;
            let mut names: Vec<&String> = index
                .weight_map
                .values()
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            names.sort();
            files = names.into_iter().map(|n| dir.join(n)).collect();
            expected = Some(index.weight_map);
        } else if dir.join("model.safetensors").exists() {
            files.push(dir.join("model.safetensors"));
        } else if let Ok(rd) = std::fs::read_dir(dir) {
            files = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            files.sort();
        }
        if files.is_empty() {
            return Err(ModelError::Checkpoint {
                path: dir.to_path_buf(),
                message:
                    "no model.safetensors, model.safetensors.index.json or *.safetensors file found"
                        .into(),
            });
        }

        let mut shards = Vec::with_capacity(files.len());
        let mut entries = BTreeMap::new();
        let mut total_bytes = 0u64;
        for (i, path) in files.iter().enumerate() {
            let file = File::open(path).map_err(|e| ModelError::Io {
                path: path.clone(),
                source: e,
            })?;
            // SAFETY: the checkpoint is opened read-only and treated as immutable for the
            // process's lifetime; modifying model files under a running engine is unsupported.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::Io {
                path: path.clone(),
                source: e,
            })?;
            let (header_len, meta) =
                SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::Checkpoint {
                    path: path.clone(),
                    message: format!("corrupt or truncated safetensors file: {e}"),
                })?;
            let data_start = 8 + header_len;
            let data_len = mmap.len().saturating_sub(data_start);
            for (name, info) in meta.tensors() {
                let (start, end) = info.data_offsets;
                if end > data_len || start > end {
                    return Err(ModelError::Checkpoint {
                        path: path.clone(),
                        message: format!(
                            "tensor {name} points past the end of the file (truncated download?)"
                        ),
                    });
                }
                total_bytes += (end - start) as u64;
                entries.insert(
                    name.clone(),
                    Entry {
                        shard: i,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start,
                        end,
                    },
                );
            }
            shards.push(Shard {
                path: path.clone(),
                mmap,
                data_start,
            });
        }
        if let Some(expected) = expected {
            let mut missing: Vec<_> = expected
                .iter()
                .filter(|(n, _)| !entries.contains_key(*n))
                .collect();
            missing.sort();
            if let Some((name, file)) = missing.first() {
                return Err(ModelError::Checkpoint {
                    path: dir.join(file),
                    message: format!(
                        "the index lists tensor {name} in this shard but the shard does not hold it ({} tensors missing)",
                        missing.len()
                    ),
                });
            }
        }
        tracing::info!(dir = %dir.display(), shards = shards.len(), tensors = entries.len(), bytes = total_bytes, "opened checkpoint");
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            shards,
            entries,
            fp8_block,
            consumed: Mutex::new(HashSet::new()),
            loaded_bytes: Mutex::new((0, Instant::now())),
            total_bytes,
            progress: {
                let p = LoadProgress::new();
                p.set_total(total_bytes);
                p
            },
        })
    }

    /// Reports the bytes read to `progress` from now on.
    pub fn with_progress(mut self, progress: Arc<LoadProgress>) -> Self {
        progress.set_total(self.total_bytes);
        self.progress = progress;
        self
    }

    /// Narrows the load's total to the tensors `wanted` accepts (an expert-parallel rank reads
    /// its own experts only), so progress and ETA are this rank's.
    pub fn expect_bytes(&mut self, wanted: impl Fn(&str) -> bool) {
        self.total_bytes = self
            .entries
            .iter()
            .filter(|(n, _)| wanted(n))
            .map(|(_, e)| (e.end - e.start) as u64)
            .sum();
        self.progress.set_total(self.total_bytes);
    }

    /// Bytes of every tensor in the checkpoint.
    pub fn total_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| (e.end - e.start) as u64)
            .sum()
    }

    /// Where `name`'s bytes are, checked against `shape`; `Ok(None)` when absent.
    pub fn raw_tensor(&self, name: &str, shape: &[usize]) -> Result<Option<RawTensor>, ModelError> {
        let Some(e) = self.entries.get(name) else {
            return Ok(None);
        };
        self.check_shape(name, e, shape)?;
        let shard = &self.shards[e.shard];
        Ok(Some(RawTensor {
            name: name.to_string(),
            path: shard.path.clone(),
            offset: (shard.data_start + e.start) as u64,
            len: e.end - e.start,
            dtype: e.dtype,
            shape: e.shape.clone(),
        }))
    }

    /// Records that a reader outside the memory map consumed `t` (progress and the
    /// unconsumed-tensor check).
    pub fn consumed_raw(&self, t: &RawTensor) {
        self.mark(&t.name, t.len);
    }

    /// Drops the pages of `e` from this process's view of the map once its bytes were copied
    /// elsewhere, so resident memory does not grow with the checkpoint. The page cache keeps
    /// them, and a later read faults them back in from the file.
    fn release(&self, e: &Entry) {
        const PAGE: usize = 4096;
        let shard = &self.shards[e.shard];
        let start = (shard.data_start + e.start) / PAGE * PAGE;
        let end = (shard.data_start + e.end).min(shard.mmap.len());
        if end <= start {
            return;
        }
        // SAFETY: the map is read-only and file-backed, so dropped pages read back the same
        // bytes from the file; nothing of the range is borrowed past the copy that came before.
        let _ = unsafe {
            shard
                .mmap
                .unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
        };
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Tensors present in the checkpoint that no layer asked for.
    pub fn unconsumed(&self) -> Vec<String> {
        let consumed = self.consumed.lock().unwrap_or_else(|e| e.into_inner());
        self.entries
            .keys()
            .filter(|n| !consumed.contains(*n))
            .cloned()
            .collect()
    }

    /// Fraction of the checkpoint's bytes read so far.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.loaded_bytes.lock().map(|g| g.0).unwrap_or(0),
            self.total_bytes,
        )
    }

    fn raw(&self, name: &str) -> Option<(&Entry, &[u8])> {
        let e = self.entries.get(name)?;
        let shard = &self.shards[e.shard];
        Some((
            e,
            &shard.mmap[shard.data_start + e.start..shard.data_start + e.end],
        ))
    }

    fn mark(&self, name: &str, bytes: usize) {
        if let Ok(mut c) = self.consumed.lock() {
            c.insert(name.to_string());
        }
        self.progress.add(bytes as u64);
        if let Ok(mut g) = self.loaded_bytes.lock() {
            let before = g.0;
            g.0 += bytes as u64;
            let step = (self.total_bytes / 10).max(1);
            if g.0 / step != before / step || g.0 == self.total_bytes {
                let secs = g.1.elapsed().as_secs_f64().max(1e-9);
                let rate = g.0 as f64 / secs;
                let eta = (self.total_bytes - g.0.min(self.total_bytes)) as f64 / rate.max(1.0);
                if self.total_bytes < 1 << 28 && g.0 < self.total_bytes {
                    return;
                }
                tracing::info!(
                    loaded_bytes = g.0,
                    total_bytes = self.total_bytes,
                    rate_mb_s = format!("{:.1}", rate / 1e6),
                    eta_s = format!("{eta:.1}"),
                    "loading weights {:.0}%",
                    100.0 * g.0 as f64 / self.total_bytes.max(1) as f64
                );
            }
        }
    }

    fn path_of(&self, e: &Entry) -> &Path {
        &self.shards[e.shard].path
    }

    /// An error naming `name`, the shape it should have and the file, unless it has `shape`.
    fn check_shape(&self, name: &str, e: &Entry, shape: &[usize]) -> Result<(), ModelError> {
        if e.shape == shape {
            return Ok(());
        }
        Err(ModelError::ShapeMismatch {
            name: name.to_string(),
            expected: shape.to_vec(),
            found: e.shape.clone(),
            path: self.path_of(e).to_path_buf(),
        })
    }
}

impl TensorSource for Checkpoint {
    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn fp8_codes(&self, name: &str, shape: &[usize]) -> Result<Option<Fp8Weight>, ModelError> {
        let Some((e, _)) = self.raw(name) else {
            return Ok(None);
        };
        if e.dtype != Dtype::F8_E4M3 {
            return Ok(None);
        }
        self.check_shape(name, e, shape)?;
        let [br, bc] = self.fp8_block;
        let scale_name = format!("{name}_scale_inv");
        let scale_shape = [shape[0].div_ceil(br), shape[1].div_ceil(bc)];
        let (se, _) = self
            .raw(&scale_name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: scale_name.clone(),
                expected: scale_shape.to_vec(),
            })?;
        self.check_shape(&scale_name, se, &scale_shape)?;
        if se.dtype != Dtype::F32 {
            return Err(ModelError::UnsupportedDtype {
                name: scale_name,
                dtype: format!("{:?} (block scales must be F32)", se.dtype),
            });
        }
        let q = self.fp8_tensor(name);
        if let Some(q) = &q {
            self.mark(name, q.codes.len());
            self.mark(&scale_name, 4 * q.scale_inv.len());
        }
        Ok(q)
    }

    fn fp8_tensor(&self, name: &str) -> Option<Fp8Weight> {
        let (e, bytes) = self.raw(name)?;
        if e.dtype != Dtype::F8_E4M3 || e.shape.len() != 2 {
            return None;
        }
        let (rows, cols) = (e.shape[0], e.shape[1]);
        let [br, bc] = self.fp8_block;
        let (se, sbytes) = self.raw(&format!("{name}_scale_inv"))?;
        if se.dtype != Dtype::F32 || se.shape != [rows.div_ceil(br), cols.div_ceil(bc)] {
            return None;
        }
        let q = Fp8Weight {
            codes: bytes.to_vec(),
            scale_inv: sbytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            rows,
            cols,
            block: self.fp8_block,
        };
        self.release(e);
        self.release(se);
        Some(q)
    }

    fn f32_tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let (e, bytes) = self.raw(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            expected: shape.to_vec(),
        })?;
        self.check_shape(name, e, shape)?;
        self.mark(name, bytes.len());
        let values = self.decode(name, e, bytes, shape);
        self.release(e);
        values
    }
}

impl Checkpoint {
    /// `bytes` of tensor `name` (entry `e`) as f32 values.
    fn decode(
        &self,
        name: &str,
        e: &Entry,
        bytes: &[u8],
        shape: &[usize],
    ) -> Result<Vec<f32>, ModelError> {
        match e.dtype {
            Dtype::F32 => Ok(bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()),
            Dtype::BF16 => Ok(bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()),
            Dtype::F16 => Ok(bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()),
            Dtype::F8_E4M3 => {
                if shape.len() != 2 {
                    return Err(ModelError::UnsupportedDtype {
                        name: name.to_string(),
                        dtype: "F8_E4M3 (only 2-D weights are block-quantized)".into(),
                    });
                }
                let scale_name = format!("{name}_scale_inv");
                let [br, bc] = self.fp8_block;
                let scale_shape = [shape[0].div_ceil(br), shape[1].div_ceil(bc)];
                let scales =
                    self.f32_tensor(&scale_name, &scale_shape)
                        .map_err(|err| match err {
                            ModelError::MissingTensor { .. } => ModelError::MissingTensor {
                                name: scale_name.clone(),
                                expected: scale_shape.to_vec(),
                            },
                            other => other,
                        })?;
                Ok(dequant_fp8_blocks(
                    bytes,
                    shape[0],
                    shape[1],
                    &scales,
                    self.fp8_block,
                ))
            }
            other => Err(ModelError::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("{other:?}"),
            }),
        }
    }
}

/// E4M3 (`float8_e4m3fn`: bias 7, no infinities, S.1111.111 is NaN) to f32, exactly.
pub fn fp8_e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0f && (b & 0x07) == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// `W[r, c] = fp8(W)[r, c] * scale_inv[r / br, c / bc]`: the checkpoint's block dequantization.
pub fn dequant_fp8_blocks(
    bytes: &[u8],
    rows: usize,
    cols: usize,
    scales: &[f32],
    block: [usize; 2],
) -> Vec<f32> {
    let table: Vec<f32> = (0..=255u8).map(fp8_e4m3_to_f32).collect();
    let sc = cols.div_ceil(block[1]);
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let srow = &scales[(r / block[0]) * sc..(r / block[0] + 1) * sc];
        for (c, b) in bytes[r * cols..(r + 1) * cols].iter().enumerate() {
            out.push(table[*b as usize] * srow[c / block[1]]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_decodes_its_edge_values() {
        assert_eq!(fp8_e4m3_to_f32(0x00), 0.0);
        assert_eq!(fp8_e4m3_to_f32(0x7e), 448.0); // largest finite
        assert_eq!(fp8_e4m3_to_f32(0xfe), -448.0);
        assert_eq!(fp8_e4m3_to_f32(0x38), 1.0);
        assert_eq!(fp8_e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(fp8_e4m3_to_f32(0x08), 2f32.powi(-6)); // smallest normal
        assert!(fp8_e4m3_to_f32(0x7f).is_nan());
    }

    #[test]
    fn fp8_blocks_take_the_scale_of_their_own_block() {
        // 3x3 weight, 2x2 blocks: scales [[1,2],[4,8]].
        let one = 0x38u8;
        let bytes = vec![one; 9];
        let out = dequant_fp8_blocks(&bytes, 3, 3, &[1.0, 2.0, 4.0, 8.0], [2, 2]);
        assert_eq!(out, vec![1.0, 1.0, 2.0, 1.0, 1.0, 2.0, 4.0, 4.0, 8.0]);
    }

    fn write_safetensors(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn a_wrong_shape_names_the_tensor_and_the_expected_shape() {
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(
            &dir.path().join("model.safetensors"),
            &[("model.norm.weight", Dtype::F32, vec![3], vec![0; 12])],
        );
        let ck = Checkpoint::open(dir.path(), [128, 128]).unwrap();
        let err = ck
            .f32_tensor("model.norm.weight", &[4])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.norm.weight") && err.contains("[4]") && err.contains("[3]"),
            "{err}"
        );
        let err = ck
            .f32_tensor("lm_head.weight", &[2, 4])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lm_head.weight") && err.contains("[2, 4]"),
            "{err}"
        );
    }

    #[test]
    fn an_fp8_weight_without_its_scale_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(
            &dir.path().join("model.safetensors"),
            &[("w.weight", Dtype::F8_E4M3, vec![2, 2], vec![0x38; 4])],
        );
        let ck = Checkpoint::open(dir.path(), [128, 128]).unwrap();
        let err = ck.f32_tensor("w.weight", &[2, 2]).unwrap_err().to_string();
        assert!(
            err.contains("w.weight_scale_inv") && err.contains("[1, 1]"),
            "{err}"
        );
    }

    #[test]
    fn fp8_codes_are_read_without_an_f32_copy_and_checked_by_name() {
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(
            &dir.path().join("model.safetensors"),
            &[
                (
                    "w.weight",
                    Dtype::F8_E4M3,
                    vec![2, 3],
                    vec![0x38, 0x40, 0xb8, 0, 1, 2],
                ),
                (
                    "w.weight_scale_inv",
                    Dtype::F32,
                    vec![1, 1],
                    0.5f32.to_le_bytes().to_vec(),
                ),
                ("v.weight", Dtype::F8_E4M3, vec![2, 2], vec![0x38; 4]),
                ("b.weight", Dtype::F32, vec![1], 1f32.to_le_bytes().to_vec()),
            ],
        );
        let ck = Checkpoint::open(dir.path(), [128, 128]).unwrap();
        let q = ck.fp8_codes("w.weight", &[2, 3]).unwrap().unwrap();
        assert_eq!(q.codes, [0x38, 0x40, 0xb8, 0, 1, 2]);
        assert_eq!(q.scale_inv, [0.5]);
        assert_eq!(q.dequantize()[..3], [0.5, 1.0, -0.5]);
        assert!(ck.unconsumed().iter().all(|n| !n.starts_with("w.")));
        // Not FP8: the caller reads it as f32.
        assert!(ck.fp8_codes("b.weight", &[1]).unwrap().is_none());
        let err = ck.fp8_codes("w.weight", &[3, 2]).unwrap_err().to_string();
        assert!(err.contains("w.weight") && err.contains("[3, 2]"), "{err}");
        let err = ck.fp8_codes("v.weight", &[2, 2]).unwrap_err().to_string();
        assert!(
            err.contains("v.weight_scale_inv") && err.contains("[1, 1]"),
            "{err}"
        );
    }

    #[test]
    fn a_truncated_file_is_refused_not_read_past_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write_safetensors(&path, &[("a", Dtype::F32, vec![64], vec![0; 256])]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
        let err = Checkpoint::open(dir.path(), [128, 128])
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.safetensors"), "{err}");
    }

    #[test]
    fn garbage_instead_of_a_checkpoint_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("model.safetensors"),
            b"not a safetensors file at all",
        )
        .unwrap();
        assert!(Checkpoint::open(dir.path(), [128, 128]).is_err());
        let empty = tempfile::tempdir().unwrap();
        let err = Checkpoint::open(empty.path(), [128, 128])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no model.safetensors"), "{err}");
    }

    #[test]
    fn a_sharded_index_naming_a_missing_tensor_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(
            &dir.path().join("a.safetensors"),
            &[("x", Dtype::F32, vec![1], vec![0; 4])],
        );
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map":{"x":"a.safetensors","y":"a.safetensors"}}"#,
        )
        .unwrap();
        let err = Checkpoint::open(dir.path(), [128, 128])
            .unwrap_err()
            .to_string();
        assert!(err.contains("tensor y"), "{err}");
    }
}
