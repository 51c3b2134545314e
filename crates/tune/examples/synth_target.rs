//! The synthesiser's target case: 8 ranks, 32 micro-batches, model costs f=8, b=16, w=8,
//! fb=19.2, comm=0.1, DualPipeV's activation cap. Usage: `synth_target [EVALUATIONS] [SEED]`.

use dualpipe_planner::Family;
use dualpipe_schedule::Costs;
use dualpipe_tune::synth::{MemoryCap, SynthCosts, SynthRequest, synthesize};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let evaluations = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let seed = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(0);
    let mut model = Costs::default();
    model
        .apply_assignments("f=8,b=16,w=8,fb=19.2,comm=0.1")
        .expect("valid costs");
    let mut request = SynthRequest::new(8, 32);
    request.memory = MemoryCap::Like(Family::DualPipeV);
    request.evaluations = evaluations;
    request.seed = seed;
    let began = std::time::Instant::now();
    let result = synthesize(&request, &SynthCosts::Model(model)).expect("synthesis");
    for b in &result.baselines {
        println!(
            "{:<18} blocking {:8.3} async {:8.3} memory {:.3}",
            b.family.name(),
            b.blocking,
            b.async_step,
            b.peak_memory
        );
    }
    println!(
        "synthesized from {}: blocking {:.3} async {:.3} memory {:.3} (cap {:?}); {} evaluations, {} lowered, {:.1} s",
        result.start,
        result.blocking,
        result.async_step,
        result.peak_memory,
        result.memory_cap,
        result.evaluations,
        result.lowered,
        began.elapsed().as_secs_f64()
    );
}
