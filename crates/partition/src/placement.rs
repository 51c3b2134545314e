//! What a schedule makes of a cut: per rank, its compute time and its memory as linear forms in
//! the layers' costs, read off the schedule's instruction lists.

use dualpipe_schedule::{Instruction, ValidSchedule};

/// Per-layer quantities the forms weigh: forward, backward without its weight-gradient part,
/// weight gradient, parameter bytes, activation bytes, overlapped forward and backward (`fb`,
/// else `f + b`). All are non-negative, so every form is non-decreasing in the layers it covers
/// (in floating point too: the prefix sums only grow).
pub(crate) const F: usize = 0;
pub(crate) const BI: usize = 1;
pub(crate) const W: usize = 2;
pub(crate) const PAR: usize = 3;
pub(crate) const ACT: usize = 4;
pub(crate) const FB: usize = 5;
pub(crate) const Q: usize = 6;

/// Which limit a constraint is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The rank's compute time (the bottleneck).
    Time,
    /// The rank's memory (the cap).
    Memory,
}

/// One rank's time or memory: `sum over (stage, weights) of weights . (sum of the stage's
/// layer quantities)`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Constraint {
    pub rank: u32,
    pub kind: Kind,
    pub terms: Vec<(usize, [f64; Q])>,
}

/// The placement of a schedule as the partitioner needs it.
#[derive(Clone, Debug)]
pub(crate) struct Placement {
    pub num_stages: usize,
    /// One time constraint per rank, then one memory constraint per rank.
    pub constraints: Vec<Constraint>,
    /// The ranks holding each stage.
    pub holders: Vec<Vec<u32>>,
    /// Per rank, per instruction: the stage whose activation a compute takes (`+`) or frees
    /// (`-`), in list order, for the exact weighted activation peak.
    pub activation_events: Vec<Vec<(usize, i8)>>,
}

impl Placement {
    /// Reads the placement off `valid`: compute counts per rank and stage (F, B, deferred B, W,
    /// FB), the stages each rank holds, and per (rank, stage) the peak number of live
    /// activations, counted in list order as the simulator counts them. With `fb`, an FB costs
    /// the `fb` of its forward stage; without, the `f` of its forward stage plus the `b` of its
    /// backward stage.
    pub fn new(valid: &ValidSchedule, fb: bool) -> Placement {
        let schedule = valid.schedule();
        let topology = valid.topology();
        let stages = schedule.num_stages as usize;
        let mut constraints = Vec::new();
        let mut memory = Vec::new();
        let mut holders = vec![Vec::new(); stages];
        let mut activation_events = Vec::new();
        for (rank, list) in schedule.ranks.iter().enumerate() {
            let mut time = vec![[0.0f64; Q]; stages];
            let mut live = vec![0i64; stages];
            let mut peak = vec![0i64; stages];
            let mut events = Vec::new();
            let mut take = |s: usize, live: &mut Vec<i64>, events: &mut Vec<(usize, i8)>| {
                live[s] += 1;
                peak[s] = peak[s].max(live[s]);
                events.push((s, 1));
            };
            for instruction in list {
                match *instruction {
                    Instruction::Forward(w) => {
                        let s = w.stage as usize;
                        time[s][F] += 1.0;
                        take(s, &mut live, &mut events);
                    }
                    Instruction::Backward { work, defer_w } => {
                        let s = work.stage as usize;
                        time[s][BI] += 1.0;
                        if !defer_w {
                            time[s][W] += 1.0;
                            live[s] -= 1;
                            events.push((s, -1));
                        }
                    }
                    Instruction::Weight(w) => {
                        let s = w.stage as usize;
                        time[s][W] += 1.0;
                        live[s] -= 1;
                        events.push((s, -1));
                    }
                    Instruction::ForwardBackward { f, b } => {
                        let (sf, sb) = (f.stage as usize, b.stage as usize);
                        if fb {
                            time[sf][FB] += 1.0;
                        } else {
                            time[sf][F] += 1.0;
                            time[sb][BI] += 1.0;
                            time[sb][W] += 1.0;
                        }
                        take(sf, &mut live, &mut events);
                        live[sb] -= 1;
                        events.push((sb, -1));
                    }
                    _ => {}
                }
            }
            let held = topology.stages_on(rank as u32);
            for &s in &held {
                holders[s as usize].push(rank as u32);
            }
            constraints.push(Constraint {
                rank: rank as u32,
                kind: Kind::Time,
                terms: time
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.iter().any(|&c| c > 0.0))
                    .map(|(s, &t)| (s, t))
                    .collect(),
            });
            memory.push(Constraint {
                rank: rank as u32,
                kind: Kind::Memory,
                terms: held
                    .iter()
                    .map(|&s| {
                        let s = s as usize;
                        let mut t = [0.0; Q];
                        t[PAR] = 1.0;
                        t[ACT] = peak[s].max(0) as f64;
                        (s, t)
                    })
                    .collect(),
            });
            activation_events.push(events);
        }
        constraints.extend(memory);
        Placement {
            num_stages: stages,
            constraints,
            holders,
            activation_events,
        }
    }

    /// Whether every constraint involves at most a stage and its mirror image (`s` and
    /// `S-1-s`): single stages (1F1B, GPipe, ZB-H1), the V (DualPipeV, ZB-V) and DualPipe. The
    /// exact method covers exactly these placements.
    pub fn is_mirrored(&self) -> bool {
        let last = self.num_stages - 1;
        self.constraints.iter().all(|c| {
            let mut k = None;
            c.terms.iter().all(|&(s, _)| {
                let pair = s.min(last - s);
                *k.get_or_insert(pair) == pair
            })
        })
    }
}
