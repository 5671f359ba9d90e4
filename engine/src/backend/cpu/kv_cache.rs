//! Host-memory storage for the paged caches: per layer, one row per slot of the MLA latent
//! (`[c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)]`) and one row of the indexer key
//! (`index_head_dim`). Slots are addressed as `kv::BlockTable::slot` returns them.

use crate::kv::KvGeometry;
use crate::model::ModelConfig;

#[derive(Debug)]
pub struct CpuKvCache {
    pub geometry: KvGeometry,
    pub latent_dim: usize,
    pub index_dim: usize,
    latent: Vec<Vec<f32>>,
    index_k: Vec<Vec<f32>>,
}

impl CpuKvCache {
    pub fn new(cfg: &ModelConfig, geometry: KvGeometry) -> Self {
        let slots = geometry.num_slots();
        let (latent_dim, index_dim) = (cfg.latent_dim(), cfg.index_head_dim);
        CpuKvCache {
            geometry,
            latent_dim,
            index_dim,
            latent: (0..cfg.num_hidden_layers)
                .map(|_| vec![0.0; slots * latent_dim])
                .collect(),
            index_k: (0..cfg.num_hidden_layers)
                .map(|_| vec![0.0; slots * index_dim])
                .collect(),
        }
    }

    /// Bytes held per token slot across all layers.
    pub fn bytes_per_slot(cfg: &ModelConfig) -> usize {
        cfg.num_hidden_layers * (cfg.latent_dim() + cfg.index_head_dim) * std::mem::size_of::<f32>()
    }

    pub fn latent(&self, layer: usize, slot: usize) -> &[f32] {
        &self.latent[layer][slot * self.latent_dim..(slot + 1) * self.latent_dim]
    }

    pub fn latent_mut(&mut self, layer: usize, slot: usize) -> &mut [f32] {
        &mut self.latent[layer][slot * self.latent_dim..(slot + 1) * self.latent_dim]
    }

    pub fn index_key(&self, layer: usize, slot: usize) -> &[f32] {
        &self.index_k[layer][slot * self.index_dim..(slot + 1) * self.index_dim]
    }

    pub fn index_key_mut(&mut self, layer: usize, slot: usize) -> &mut [f32] {
        &mut self.index_k[layer][slot * self.index_dim..(slot + 1) * self.index_dim]
    }
}
