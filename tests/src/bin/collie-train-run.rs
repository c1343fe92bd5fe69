//! `collie-train-run --config X.toml [--set k=v]...`: the plain trainer behind the recipes, with
//! nothing prepared and nothing reported — what the MPI tests launch under `mpirun`.

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use collie_io::family::TrainModel;
use collie_train::cli::Recipe;
use collie_train::{TrainConfig, Trainer};

struct Plain;

impl Recipe for Plain {
    const NAME: &'static str = "collie-train-run";
    const DEFAULT_CONFIG: &'static str = "";

    fn prepare(&self, _config: &mut TrainConfig) -> Result<()> {
        Ok(())
    }

    fn report<B: AutodiffBackend, M: TrainModel<B>>(
        &self,
        _trainer: &Trainer<B, M>,
        _before: bool,
    ) -> Result<()> {
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    collie_train::cli::main::<_, collie_models::Registry>(Plain)
}
