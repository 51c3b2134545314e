//! The pure half of the binding: what the Python objects hold, computed without Python, so that
//! it can be tested with `cargo test`.

use dualpipe_schedule::{
    ExecutionModel, Instruction, Kind, Location, ParseError, Rule, ValidationErrors, Work,
};
use serde_json::{Map, Value, json};

/// A short, stable name of a rule for programs: `structure`, `completeness`,
/// `data-dependency`, `communication`, `progress`.
pub fn rule_name(rule: Rule) -> &'static str {
    match rule {
        Rule::Structure => "structure",
        Rule::Completeness => "completeness",
        Rule::DataDependency => "data-dependency",
        Rule::Communication => "communication",
        Rule::Progress => "progress",
    }
}

/// One problem of a schedule that failed to load, as `ScheduleError` exposes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The rank, unless the problem is in the document header.
    pub rank: Option<u32>,
    /// The instruction index in the rank's list, when one instruction is at fault.
    pub index: Option<usize>,
    /// That instruction in compact form (`F s3 m12`), when it parsed.
    pub instruction: Option<String>,
    /// The rule broken ([`rule_name`]); `None` for a document that does not parse.
    pub rule: Option<&'static str>,
    /// The problem in words, as the validator states it (without the location).
    pub message: String,
}

/// Every violation of a schedule that failed validation, in the validator's order.
pub fn validation_problems(errors: &ValidationErrors) -> Vec<Problem> {
    errors
        .violations
        .iter()
        .map(|v| {
            let (rank, index, instruction) = match &v.location {
                Location::Document => (None, None, None),
                Location::Rank(rank) => (Some(*rank), None, None),
                Location::Instruction {
                    rank,
                    index,
                    instruction,
                } => (Some(*rank), Some(*index), Some(instruction.to_string())),
            };
            Problem {
                rank,
                index,
                instruction,
                rule: Some(rule_name(v.rule)),
                message: v.message.clone(),
            }
        })
        .collect()
}

/// The one problem of a document that does not parse.
pub fn parse_problem(error: &ParseError) -> Problem {
    match error {
        ParseError::Document(e) => Problem {
            rank: None,
            index: None,
            instruction: None,
            rule: None,
            message: e.to_string(),
        },
        ParseError::Instruction {
            rank,
            index,
            reason,
            text,
        } => Problem {
            // The schedule is far from 2^32 ranks if it parsed this far; saturate anyway.
            rank: Some(u32::try_from(*rank).unwrap_or(u32::MAX)),
            index: Some(*index),
            instruction: None,
            rule: None,
            message: format!("{reason} in {text}"),
        },
    }
}

/// An instruction as its JSON object, with `defer_w` always present on a `B`.
pub fn instruction_value(instruction: &Instruction) -> Value {
    let work = |w: &Work| json!({"stage": w.stage, "mb": w.mb});
    let kind = |k: Kind| match k {
        Kind::Act => "act",
        Kind::Grad => "grad",
    };
    match instruction {
        Instruction::Forward(w) => json!({"op": "F", "stage": w.stage, "mb": w.mb}),
        Instruction::Backward { work, defer_w } => {
            json!({"op": "B", "stage": work.stage, "mb": work.mb, "defer_w": defer_w})
        }
        Instruction::Weight(w) => json!({"op": "W", "stage": w.stage, "mb": w.mb}),
        Instruction::ForwardBackward { f, b } => json!({"op": "FB", "f": work(f), "b": work(b)}),
        Instruction::Send(m) => json!({
            "op": "send", "kind": kind(m.kind), "stage": m.stage, "mb": m.mb, "peer": m.peer
        }),
        Instruction::Recv(m) => json!({
            "op": "recv", "kind": kind(m.kind), "stage": m.stage, "mb": m.mb, "peer": m.peer
        }),
        Instruction::Commit => json!({"op": "commit"}),
    }
}

/// The execution model named `name` (`blocking` or `async`).
pub fn parse_model(name: &str) -> Result<ExecutionModel, String> {
    match name {
        "blocking" => Ok(ExecutionModel::Blocking),
        "async" => Ok(ExecutionModel::Async),
        other => Err(format!(
            "unknown execution model {other:?}; expected \"blocking\" or \"async\""
        )),
    }
}

/// Whether a `costs` string is a list of assignments (`f=1,b=2`) rather than a cost file's
/// path: it holds an `=` and no path separator.
pub fn is_assignment_list(text: &str) -> bool {
    text.contains('=') && !text.contains('/') && !text.contains(std::path::MAIN_SEPARATOR)
}

/// Checks the shape of a cost file given as a Python dict (converted to JSON) so that a value
/// of the wrong type is named by its field; the rest (unknown fields, ranges) is left to
/// `Costs::from_json`, which names fields itself.
pub fn check_cost_shape(value: &Value) -> Result<(), String> {
    let Value::Object(fields) = value else {
        return Err("costs: expected a dict of cost fields".into());
    };
    for (key, v) in fields {
        if key == "unit" {
            if !v.is_string() {
                return Err(format!("costs: `unit` must be a str, got {}", kind_of(v)));
            }
        } else if key == "stages" || key == "layers" {
            let Value::Array(entries) = v else {
                return Err(format!(
                    "costs: `{key}` must be a list of dicts, got {}",
                    kind_of(v)
                ));
            };
            for (i, entry) in entries.iter().enumerate() {
                let Value::Object(entry) = entry else {
                    return Err(format!(
                        "costs: {key}[{i}] must be a dict, got {}",
                        kind_of(entry)
                    ));
                };
                let mut numbers = entry.clone();
                if key == "layers"
                    && let Some(name) = numbers.remove("name")
                    && !name.is_string()
                {
                    return Err(format!(
                        "costs: `{key}[{i}].name` must be a str, got {}",
                        kind_of(&name)
                    ));
                }
                check_numbers(&format!("{key}[{i}]."), &numbers)?;
            }
        } else {
            check_numbers("", &Map::from_iter([(key.clone(), v.clone())]))?;
        }
    }
    Ok(())
}

fn check_numbers(place: &str, fields: &Map<String, Value>) -> Result<(), String> {
    for (key, v) in fields {
        if !v.is_number() {
            return Err(format!(
                "costs: `{place}{key}` must be a number, got {}",
                kind_of(v)
            ));
        }
    }
    Ok(())
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "None",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a str",
        Value::Array(_) => "a list",
        Value::Object(_) => "a dict",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualpipe_planner::{Family, PlanRequest, plan};
    use dualpipe_schedule::{Schedule, parse_program, validate};

    #[test]
    fn instruction_values_are_the_wire_objects_with_defer_w_spelled_out() {
        let schedule = plan(&PlanRequest::new(Family::DualPipeV, 2, 4))
            .unwrap()
            .into_inner();
        let mut seen = std::collections::BTreeSet::new();
        let zb = plan(&PlanRequest::new(Family::Zb1p, 2, 4))
            .unwrap()
            .into_inner();
        for instruction in schedule.ranks.iter().chain(&zb.ranks).flatten() {
            let mut wire = serde_json::to_value(instruction).unwrap();
            if let Value::Object(fields) = &mut wire
                && fields["op"] == "B"
            {
                fields.entry("defer_w").or_insert(Value::Bool(false));
            }
            let value = instruction_value(instruction);
            assert_eq!(value, wire, "{instruction}");
            seen.insert(value["op"].as_str().unwrap().to_string());
        }
        let ops: Vec<&str> = seen.iter().map(String::as_str).collect();
        assert_eq!(ops, ["B", "F", "FB", "W", "commit", "recv", "send"]);
    }

    #[test]
    fn problems_name_rank_index_instruction_and_rule() {
        let mut schedule = plan(&PlanRequest::new(Family::OneFOneB, 2, 2))
            .unwrap()
            .into_inner();
        schedule.ranks[1] = parse_program("F s1 m0 | B s1 m0 | F s1 m1 | B s1 m1").unwrap();
        let errors = validate(&schedule).unwrap_err();
        let problems = validation_problems(&errors);
        assert_eq!(problems.len(), errors.violations.len());
        let first = &problems[0];
        assert_eq!(
            (first.rank, first.index, first.instruction.as_deref()),
            (Some(1), Some(0), Some("F s1 m0"))
        );
        assert_eq!(first.rule, Some("data-dependency"));
        assert!(errors.to_string().contains(&first.message));
    }

    #[test]
    fn parse_problems_keep_the_place_of_a_bad_instruction() {
        let text = plan(&PlanRequest::new(Family::OneFOneB, 2, 2))
            .unwrap()
            .schedule()
            .to_json()
            .replacen(r#""op": "F""#, r#""op": "X""#, 1);
        let error = Schedule::from_json(&text).unwrap_err();
        let problem = parse_problem(&error);
        assert_eq!(
            (problem.rank, problem.index, problem.rule),
            (Some(0), Some(0), None)
        );
        assert!(error.to_string().ends_with(&problem.message));
        let header = parse_problem(&Schedule::from_json("{}").unwrap_err());
        assert_eq!((header.rank, header.index), (None, None));
    }

    #[test]
    fn models_and_cost_strings() {
        assert_eq!(parse_model("async"), Ok(ExecutionModel::Async));
        assert!(
            parse_model("Async")
                .unwrap_err()
                .contains("\"blocking\" or \"async\"")
        );
        assert!(is_assignment_list("f=1,b=2"));
        assert!(!is_assignment_list("costs/f=1.json"));
        assert!(!is_assignment_list("costs.json"));
    }

    #[test]
    fn cost_shapes_name_the_field() {
        assert_eq!(
            check_cost_shape(&json!({"f": 1, "stages": [{"stage": 0, "b": 2.5}]})),
            Ok(())
        );
        assert_eq!(
            check_cost_shape(&json!({"f": "1"})).unwrap_err(),
            "costs: `f` must be a number, got a str"
        );
        assert_eq!(
            check_cost_shape(&json!({"stages": [{"stage": 0, "w": null}]})).unwrap_err(),
            "costs: `stages[0].w` must be a number, got None"
        );
        assert_eq!(
            check_cost_shape(&json!({"unit": 1})).unwrap_err(),
            "costs: `unit` must be a str, got a number"
        );
        assert_eq!(
            check_cost_shape(&json!({"layers": [{"name": 3, "f": 1}]})).unwrap_err(),
            "costs: `layers[0].name` must be a str, got a number"
        );
        assert_eq!(
            check_cost_shape(&json!({"layers": [{"name": "a", "f": "1"}]})).unwrap_err(),
            "costs: `layers[0].f` must be a number, got a str"
        );
        check_cost_shape(
            &json!({"unit": "ms", "f": 1, "stages": [{"stage": 0, "param_bytes": 8}],
            "layers": [{"name": "embed", "f": 1, "b": 2, "w": 1}]}),
        )
        .unwrap();
        assert_eq!(check_cost_shape(&json!({"unit": "ms", "f": 1})), Ok(()));
        assert!(
            check_cost_shape(&json!({"stages": 3}))
                .unwrap_err()
                .contains("`stages`")
        );
        assert!(check_cost_shape(&json!([1])).is_err());
    }
}
