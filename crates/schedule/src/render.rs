//! Pictures of a timed schedule: a time-scaled text grid (like the DualPipe README figures) and
//! an SVG with one colour per kind of compute and direction, and a legend.
//!
//! Both take the schedule and a [`Timeline`], simulated ([`crate::Simulation::timeline`]) or
//! measured (a profile, or a Chrome trace read back), and label computes as the `inspect` grid does: `F` forward, `B` full backward,
//! `I` backward with deferred weights, `W` weight gradient, then the micro-batch; upper case on
//! the first stage a rank holds along the route (leg 0), lower case on the second (leg 1).

use std::fmt::Write as _;

use crate::format::{Instruction, Work};
use crate::order::Legs;
use crate::timeline::Lane;
use crate::timeline::Timeline;
use crate::validate::ValidSchedule;

/// Widest grid chosen automatically, in columns: labels are cut beyond this.
const MAX_AUTO_COLUMNS: f64 = 1000.0;
/// Widest grid at all, in columns, whatever `columns_per_unit` asks for.
const MAX_COLUMNS: f64 = 20000.0;

/// The text grid: one row per rank, `columns_per_unit` characters per time unit (by default the
/// fewest that fit every label, within 1000 columns; never wider than 20000 columns). Each
/// compute starts with its label; `.` marks idle time.
///
/// ```
/// use dualpipe_schedule::{parse_program, simulate, timeline_text, Costs, ExecutionModel,
///     Format, Pipeline, Schedule, ValidSchedule};
/// let schedule = Schedule {
///     format: Format::V1, schedule: "demo".into(), num_ranks: 1, num_stages: 1,
///     num_microbatches: 2, forward_only: false,
///     pipelines: vec![Pipeline { route: vec![0], microbatches: vec![0, 1] }],
///     ranks: vec![parse_program("F s0 m0 | F s0 m1 | B s0 m0 | B s0 m1").unwrap()],
/// };
/// let valid = ValidSchedule::new(schedule).unwrap();
/// let sim = simulate(&valid, &Costs::default(), ExecutionModel::Blocking).unwrap();
/// let text = timeline_text(&valid, &sim.timeline(valid.schedule()), Some(3.0));
/// assert!(text.contains("rank 0 F0 F1 B0    B1"));
/// ```
pub fn timeline_text(
    valid: &ValidSchedule,
    sim: &Timeline,
    columns_per_unit: Option<f64>,
) -> String {
    let schedule = valid.schedule();
    let legs = Legs::new(valid.topology());
    let computes = computes(valid, sim, &legs);
    let span = sim.makespan.max(1e-9);
    let scale = match columns_per_unit {
        Some(s) if s.is_finite() && s > 0.0 => s.min(MAX_COLUMNS / span),
        _ => fitting_scale(&computes).min(MAX_AUTO_COLUMNS / span),
    };
    let column = |t: f64| (t * scale).round() as usize;
    let width = column(sim.makespan);
    let name_width = format!("rank {}", schedule.ranks.len().saturating_sub(1)).len();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} ranks, {} stages, {} micro-batches; {}; step time {}{}; {} columns per {}",
        schedule.schedule,
        schedule.num_ranks,
        schedule.num_stages,
        schedule.num_microbatches,
        sim.source,
        number(sim.makespan),
        unit_suffix(&sim.unit),
        number(scale),
        if sim.unit.is_empty() {
            "time unit"
        } else {
            &sim.unit
        }
    );
    // The time axis: a tick label every `step` units, spaced at least 6 columns apart and
    // wider than the longest label.
    let widest = number(sim.makespan)
        .len()
        .max(number(nice_step(6.0 / scale)).len())
        + 2;
    let step = nice_step(widest.max(6) as f64 / scale);
    let mut axis = vec![b' '; width + 16];
    for k in 0u64.. {
        let t = k as f64 * step;
        let at = column(t);
        if at > width {
            break;
        }
        let label = number(t);
        if axis.len() < at + label.len() {
            axis.resize(at + label.len(), b' ');
        }
        axis[at..at + label.len()].copy_from_slice(label.as_bytes());
    }
    let axis = String::from_utf8(axis).expect("ASCII");
    let _ = writeln!(out, "{:<name_width$} {}", "time", axis.trim_end());
    for (rank, row) in computes.iter().enumerate() {
        let mut line = vec![b'.'; width];
        for c in row {
            let (from, to) = (column(c.start), column(c.end).min(width));
            if to <= from {
                continue;
            }
            line[from..to].fill(b' ');
            let label = c.label.as_bytes();
            let shown = label.len().min(to - from);
            line[from..from + shown].copy_from_slice(&label[..shown]);
        }
        let line = String::from_utf8(line).expect("ASCII");
        let _ = writeln!(
            out,
            "{:<name_width$} {}",
            format!("rank {rank}"),
            line.trim_end()
        );
    }
    out.push_str(
        "\nF forward, B full backward, I backward with deferred weights, W weight gradient, \
         F3+b7 overlapped pair;\nupper case: first stage a rank holds along the route, lower \
         case: second (`:k` for the k-th); '.' idle\n",
    );
    out
}

/// One compute, ready to draw.
struct Compute {
    start: f64,
    end: f64,
    label: String,
    /// (kind, leg, micro-batch) of each half: one for F, B, I and W, two for FB.
    parts: Vec<(Part, u32, u32)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Forward,
    Backward,
    InputOnly,
    Weight,
}

impl Part {
    const ALL: [Part; 4] = [Part::Forward, Part::Backward, Part::InputOnly, Part::Weight];

    fn name(self) -> &'static str {
        match self {
            Part::Forward => "F forward",
            Part::Backward => "B backward",
            Part::InputOnly => "I backward, weights deferred",
            Part::Weight => "W weight gradient",
        }
    }

    /// Fill colours by leg: dark, light, middle (cycled for more legs).
    fn colours(self) -> [&'static str; 3] {
        match self {
            Part::Forward => ["#e8743b", "#f9c49a", "#c0392b"],
            Part::Backward => ["#3b6fb6", "#a9c8ec", "#1f3f73"],
            Part::InputOnly => ["#2e9e6a", "#a6dcc0", "#1b5e3f"],
            Part::Weight => ["#8e5ba8", "#d7bde6", "#5b3470"],
        }
    }

    fn colour(self, leg: u32) -> &'static str {
        self.colours()[leg as usize % 3]
    }
}

fn computes(valid: &ValidSchedule, sim: &Timeline, legs: &Legs) -> Vec<Vec<Compute>> {
    let schedule = valid.schedule();
    let times = sim.computes(valid);
    schedule
        .ranks
        .iter()
        .enumerate()
        .map(|(rank, list)| {
            let rank_id = rank as u32;
            let part = |kind: Part, w: Work| (kind, legs.leg(rank_id, w), w.mb);
            list.iter()
                .enumerate()
                .filter_map(|(index, &instruction)| {
                    times[rank][index].map(|(start, end)| (start, end, instruction))
                })
                .map(|(start, end, instruction)| {
                    let parts = match instruction {
                        Instruction::Forward(w) => vec![part(Part::Forward, w)],
                        Instruction::Backward { work, defer_w } => vec![part(
                            if defer_w {
                                Part::InputOnly
                            } else {
                                Part::Backward
                            },
                            work,
                        )],
                        Instruction::Weight(w) => vec![part(Part::Weight, w)],
                        Instruction::ForwardBackward { f, b } => {
                            vec![part(Part::Forward, f), part(Part::Backward, b)]
                        }
                        _ => Vec::new(),
                    };
                    Compute {
                        start,
                        end,
                        label: legs.label(rank_id, instruction),
                        parts,
                    }
                })
                .collect()
        })
        .collect()
}

/// The fewest columns per time unit at which every compute that takes time has room for its
/// label and a space: a whole number when one column per unit is not enough.
fn fitting_scale(computes: &[Vec<Compute>]) -> f64 {
    let needed = computes
        .iter()
        .flatten()
        .filter(|c| c.end > c.start)
        .map(|c| (c.label.len() as f64 + 1.0) / (c.end - c.start))
        .fold(0.0, f64::max);
    if needed <= 0.0 {
        1.0
    } else if needed >= 1.0 {
        needed.ceil()
    } else {
        needed
    }
}

/// The smallest of 1, 2, 5 times a power of ten that is at least `min`.
fn nice_step(min: f64) -> f64 {
    if !(min.is_finite() && min > 0.0) {
        return 1.0;
    }
    let power = 10f64.powi(min.log10().floor() as i32);
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|&v| v >= min * (1.0 - 1e-12))
        .unwrap_or(10.0 * power)
}

/// ` ms` after a time in a named unit; nothing for abstract units.
fn unit_suffix(unit: &str) -> String {
    if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    }
}

fn number(value: f64) -> String {
    if value != 0.0 && !(1e-3..1e9).contains(&value.abs()) {
        let text = format!("{value:.3e}");
        let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
        let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
        return format!("{mantissa}e{exponent}");
    }
    let text = format!("{value:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

// SVG geometry, in pixels.
const LEFT: f64 = 64.0;
const TOP: f64 = 46.0;
const ROW: f64 = 34.0;
const BAR: f64 = 26.0;
const MAX_WIDTH: f64 = 4000.0;

/// The SVG picture: one row per rank, computes as boxes coloured by kind (F, B, I, W) and leg
/// (dark: first stage along the route, light: second), labelled with their micro-batch when
/// there is room; an FB is split into its forward (top) and backward (bottom) halves; a grey
/// line under a row marks time in communication batches. A time axis and a legend are included.
pub fn timeline_svg(valid: &ValidSchedule, sim: &Timeline) -> String {
    let schedule = valid.schedule();
    let legs = Legs::new(valid.topology());
    let computes = computes(valid, sim, &legs);
    let span = sim.makespan.max(1e-9);
    let unit = (MAX_WIDTH / span).min(18.0);
    let x = |t: f64| LEFT + t * unit;
    let plot_width = span * unit;
    let rows = schedule.ranks.len() as f64;
    let legend_top = TOP + rows * ROW + 34.0;
    let width = (LEFT + plot_width + 20.0).max(760.0);
    let height = legend_top + 64.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="DejaVu Sans, Arial, Helvetica, sans-serif">"#
    );
    let _ = writeln!(
        out,
        r#"<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="white"/>"#
    );
    let idle: f64 = sim.busy.iter().map(|busy| sim.makespan - busy).sum();
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="20" font-size="14" font-weight="bold">{}: {} ranks, {} stages, {} micro-batches, {}, step time {}{}, bubble {:.1}%</text>"#,
        escape(&schedule.schedule),
        schedule.num_ranks,
        schedule.num_stages,
        schedule.num_microbatches,
        sim.source,
        number(sim.makespan),
        escape(&unit_suffix(&sim.unit)),
        100.0 * idle / (span * rows)
    );
    // Time axis with grid lines, at least 40 pixels apart.
    let step = nice_step(40.0 / unit);
    for k in 0u64.. {
        let t = k as f64 * step;
        if t > span * (1.0 + 1e-12) {
            break;
        }
        let tx = x(t);
        let _ = writeln!(
            out,
            r##"<line x1="{tx:.2}" y1="{:.2}" x2="{tx:.2}" y2="{:.2}" stroke="#dddddd" stroke-width="1"/><text x="{tx:.2}" y="{:.2}" font-size="10" text-anchor="middle" fill="#555555">{}</text>"##,
            TOP - 4.0,
            TOP + rows * ROW,
            TOP - 8.0,
            number(t)
        );
    }
    for (rank, row) in computes.iter().enumerate() {
        let y = TOP + rank as f64 * ROW + (ROW - BAR) / 2.0;
        let _ = writeln!(
            out,
            r#"<text x="{:.2}" y="{:.2}" font-size="12" text-anchor="end" dominant-baseline="central">rank {rank}</text>"#,
            LEFT - 8.0,
            y + BAR / 2.0
        );
        // Communication batches that took time: a thin line under the row.
        let comm = sim
            .spans
            .iter()
            .filter(|s| s.rank as usize == rank && s.lane == Lane::Comm);
        for t in comm {
            if t.end > t.start {
                let _ = writeln!(
                    out,
                    r##"<rect x="{:.2}" y="{:.2}" width="{:.2}" height="3" fill="#9a9a9a"/>"##,
                    x(t.start),
                    y + BAR + 1.0,
                    (t.end - t.start) * unit
                );
            }
        }
        for c in row {
            let (x0, w) = (x(c.start), (c.end - c.start) * unit);
            if w <= 0.0 {
                continue;
            }
            let halves = c.parts.len() as f64;
            let h = BAR / halves;
            for (k, &(part, leg, mb)) in c.parts.iter().enumerate() {
                let fill = part.colour(leg);
                let y0 = y + k as f64 * h;
                let _ = write!(
                    out,
                    r##"<rect x="{x0:.2}" y="{y0:.2}" width="{w:.2}" height="{h:.2}" fill="{fill}" stroke="white" stroke-width="0.8"><title>rank {rank}: {} [{}, {}]</title></rect>"##,
                    escape(&c.label),
                    number(c.start),
                    number(c.end)
                );
                let text = mb.to_string();
                let size = if halves > 1.0 { 9.0 } else { 10.0 };
                if w >= text.len() as f64 * size * 0.62 + 2.0 {
                    let _ = write!(
                        out,
                        r#"<text x="{:.2}" y="{:.2}" font-size="{size}" text-anchor="middle" dominant-baseline="central" fill="{}">{text}</text>"#,
                        x0 + w / 2.0,
                        y0 + h / 2.0,
                        text_colour(leg)
                    );
                }
                out.push('\n');
            }
        }
    }
    // Legend: one swatch per kind and leg, then the FB and communication keys.
    let shades = computes
        .iter()
        .flatten()
        .flat_map(|c| c.parts.iter().map(|p| p.1))
        .max()
        .unwrap_or(0)
        .clamp(1, 2)
        + 1;
    let mut lx = LEFT;
    let ly = legend_top;
    for part in Part::ALL {
        for leg in 0..shades {
            let _ = write!(
                out,
                r##"<rect x="{lx:.2}" y="{ly:.2}" width="14" height="14" fill="{}" stroke="#777777" stroke-width="0.5"/>"##,
                part.colour(leg)
            );
            lx += 16.0;
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.2}" y="{:.2}" font-size="12" dominant-baseline="central">{}</text>"#,
            lx + 2.0,
            ly + 7.0,
            part.name()
        );
        lx += 14.0 + part.name().len() as f64 * 6.6;
    }
    let ly2 = ly + 24.0;
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{ly2:.2}" width="30" height="7" fill="{}"/><rect x="{LEFT}" y="{:.2}" width="30" height="7" fill="{}"/><text x="{:.2}" y="{:.2}" font-size="12" dominant-baseline="central">FB: forward (top) overlapped with backward (bottom)</text>"##,
        Part::Forward.colour(0),
        ly2 + 7.0,
        Part::Backward.colour(1),
        LEFT + 36.0,
        ly2 + 7.0
    );
    let cx = LEFT + 400.0;
    let _ = writeln!(
        out,
        r##"<rect x="{cx:.2}" y="{:.2}" width="30" height="3" fill="#9a9a9a"/><text x="{:.2}" y="{:.2}" font-size="12" dominant-baseline="central">communication batch</text>"##,
        ly2 + 5.5,
        cx + 36.0,
        ly2 + 7.0
    );
    let shading = if shades > 2 {
        "dark, light, deep: first, second, third stage a rank holds along the route (cycling)"
    } else {
        "dark: first stage a rank holds along the route (DualPipe: direction 0 to N-1; DualPipeV: down the V); light: second"
    };
    let _ = writeln!(
        out,
        r##"<text x="{LEFT}" y="{:.2}" font-size="11" fill="#555555">{shading}; numbers are micro-batches</text>"##,
        ly2 + 26.0
    );
    out.push_str("</svg>\n");
    out
}

/// White on the dark (leg 0 and leg 2) fills, black on the light ones.
fn text_colour(leg: u32) -> &'static str {
    if leg % 3 == 1 { "#1a1a1a" } else { "white" }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::costs::Costs;
    use crate::diagnostics::ExecutionModel;
    use crate::format::{Format, Pipeline, Schedule};
    use crate::parse_program;
    use crate::simulate::simulate;

    fn one_rank() -> ValidSchedule {
        ValidSchedule::new(Schedule {
            format: Format::V1,
            schedule: "demo".into(),
            num_ranks: 1,
            num_stages: 1,
            num_microbatches: 2,
            forward_only: false,
            pipelines: vec![Pipeline {
                route: vec![0],
                microbatches: vec![0, 1],
            }],
            ranks: vec![parse_program("F s0 m0 | F s0 m1 | B s0 m0 | B s0 m1").unwrap()],
        })
        .unwrap()
    }

    #[test]
    fn huge_times_fit_the_axis() {
        // Axis labels longer than the grid's margin used to index out of range.
        let valid = one_rank();
        for list in ["f=1e15,b=2e15,w=1e15", "f=1e300,b=2e300,w=1e300"] {
            let mut costs = Costs::default();
            costs.apply_assignments(list).unwrap();
            let sim = simulate(&valid, &costs, ExecutionModel::Blocking).unwrap();
            let sim = sim.timeline(valid.schedule());
            let text = timeline_text(&valid, &sim, None);
            assert!(text.contains("rank 0 F0"), "{list}: {text}");
            let axis = text.lines().nth(1).unwrap();
            assert!(
                axis.split_whitespace().count() >= 3,
                "{list}: labels run together: {axis}"
            );
            assert!(timeline_svg(&valid, &sim).len() < 100_000, "{list}");
        }
    }
}
