//! The warm-up depth curve of the synthesiser's target case: DualPipeV's order with more steps
//! of lag on some rank boundaries (more micro-batches in flight), lowered for the costs and
//! simulated under both execution models.
//!
//! `cargo run --release -p dualpipe-tune --example depth_curve [-- N C COSTS]`
//! (default: 8 32 f=8,b=16,w=8,fb=19.2,comm=0.1; whole-model costs as `--model-cost` takes
//! them, divided over the 2N stages of the V).

use dualpipe_schedule::Costs;
use dualpipe_tune::synth::{Depth, SynthCosts, deep_v};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: u32 = args.first().map_or(8, |a| a.parse().expect("N"));
    let c: u32 = args.get(1).map_or(32, |a| a.parse().expect("C"));
    let list = args
        .get(2)
        .map_or("f=8,b=16,w=8,fb=19.2,comm=0.1", String::as_str);
    let mut model = Costs::default();
    model.apply_assignments(list).expect("costs");
    let costs = SynthCosts::Model(model);
    println!("{n} ranks, {c} micro-batches, model costs {list}");
    println!("extra lag 0 is DualPipeV's own order; peak in N-ths of the model's activations");
    println!();
    println!(
        "{:<12} {:<16} {:>9} {:>9} {:>6}",
        "extra lag", "long boundaries", "blocking", "async", "peak"
    );
    let mut rows: Vec<Depth> = (0..n).map(|k| Depth::spread(n, k)).collect();
    // One long boundary, at each place.
    rows.extend((0..n.saturating_sub(1)).map(|j| Depth::boundaries(n, &[j])));
    // Two steps of lag everywhere.
    rows.push(Depth {
        lag: vec![2; n.saturating_sub(1) as usize],
    });
    let mut seen = Vec::new();
    for depth in rows {
        if seen.contains(&depth) {
            continue;
        }
        seen.push(depth.clone());
        let long: Vec<String> = depth.lag.iter().map(u32::to_string).collect();
        match deep_v(n, c, &costs, &depth).expect("deep_v") {
            Some(p) => println!(
                "{:<12} {:<16} {:>9.1} {:>9.1} {:>6.1}",
                depth.total(),
                long.join(""),
                p.blocking,
                p.async_step,
                p.peak_memory
            ),
            None => println!("{:<12} {:<16} (C too few)", depth.total(), long.join("")),
        }
    }
}
