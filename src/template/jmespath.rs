//! JMESPath with the MedTech custom functions (`add`, `subtract`, `multiply`, `divide`, `pow`,
//! `insertString`, `fromUnixTimestamp`, `fromUnixTimestampMs`), on the `jmespath` crate.
//!
//! Arithmetic stays in integers while both arguments are integers and the result is exact
//! (checked: overflow is an error, not a wrap); otherwise it is done in f64. Unlike the reference,
//! `divide(40, 50)` is 0.8, as the MedTech docs promise (a deliberate difference, see DESIGN.md).

use chrono::{DateTime, SecondsFormat, Utc};
use jmespath::ast::Ast;
use jmespath::functions::{ArgumentType, CustomFunction, Signature};
use jmespath::{Context, ErrorReason, JmespathError, Rcvar, Runtime, Variable};
use serde_json::{Number, Value};
use std::sync::OnceLock;

pub type Expression = jmespath::Expression<'static>;

/// The one runtime every compiled expression borrows: built-ins plus the custom functions.
pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        let mut rt = Runtime::new();
        rt.register_builtin_functions();
        for (name, _) in CUSTOM_ARITY {
            rt.register_function(name, custom(name));
        }
        rt
    })
}

/// (name, arity) of the custom functions; `None` arity means variadic.
const CUSTOM_ARITY: [(&str, Option<usize>); 8] = [
    ("add", Some(2)),
    ("subtract", Some(2)),
    ("multiply", Some(2)),
    ("divide", Some(2)),
    ("pow", Some(2)),
    ("insertString", Some(3)),
    ("fromUnixTimestamp", Some(1)),
    ("fromUnixTimestampMs", Some(1)),
];

/// Arity of the JMESPath built-ins, so a wrong call is caught when the template loads, not on the
/// first message that reaches it. `(min, Some(max))`, or `(min, None)` for variadic functions.
const BUILTIN_ARITY: [(&str, usize, Option<usize>); 26] = [
    ("abs", 1, Some(1)),
    ("avg", 1, Some(1)),
    ("ceil", 1, Some(1)),
    ("contains", 2, Some(2)),
    ("ends_with", 2, Some(2)),
    ("floor", 1, Some(1)),
    ("join", 2, Some(2)),
    ("keys", 1, Some(1)),
    ("length", 1, Some(1)),
    ("map", 2, Some(2)),
    ("max", 1, Some(1)),
    ("max_by", 2, Some(2)),
    ("merge", 1, None),
    ("min", 1, Some(1)),
    ("min_by", 2, Some(2)),
    ("not_null", 1, None),
    ("reverse", 1, Some(1)),
    ("sort", 1, Some(1)),
    ("sort_by", 2, Some(2)),
    ("starts_with", 2, Some(2)),
    ("sum", 1, Some(1)),
    ("to_array", 1, Some(1)),
    ("to_number", 1, Some(1)),
    ("to_string", 1, Some(1)),
    ("type", 1, Some(1)),
    ("values", 1, Some(1)),
];

/// How deep an expression may nest, as [`nesting`] counts it. The crate's parser, its evaluator
/// and dropping its syntax tree all recurse once per level and have no bound of their own: 250
/// levels (`!!!…a`, `a.a.a…`, `[[[…`) overflowed a 2 MiB thread stack in a debug build, 2,000 in
/// release. A real template stays under a dozen.
pub const MAX_NESTING: usize = 64;

/// Compiles an expression and checks every function call it makes (name and argument count).
pub fn compile(text: &str) -> Result<Expression, String> {
    if let Err(offset) = nesting(text, MAX_NESTING) {
        return Err(format!("the expression nests more than {MAX_NESTING} deep (at character {})", offset + 1));
    }
    let expr = runtime().compile(text).map_err(|e| describe(&e))?;
    check_calls(expr.as_ast())?;
    Ok(expr)
}

/// Checks, from the text alone and before the crate's parser sees it, that no syntax tree of the
/// expression can be deeper than `limit`; `Err` holds the character offset where it first could.
///
/// An upper bound, not the exact depth: within one bracket level every operator can add a level
/// (`a.b.c` is two subexpressions, one inside the other) until a `,` or `:` starts a sibling, and
/// every bracket opens a level inside the current one. Strings, quoted names and JSON literals
/// count nothing (a literal's JSON nesting is bounded by serde_json's own limit).
fn nesting(text: &str, limit: usize) -> Result<(), usize> {
    // The operators counted in each open bracket level since its last separator.
    let mut levels: Vec<usize> = vec![0];
    let mut depth = 1;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (offset, c) in text.chars().enumerate() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        let top = levels.len() - 1;
        match c {
            '\'' | '"' | '`' => quote = Some(c),
            '(' | '[' | '{' => {
                levels[top] += 1;
                levels.push(0);
                depth += 2;
            }
            ')' | ']' | '}' if top > 0 => {
                // Its operators and itself; the bracket stays counted in the level around it.
                depth -= levels.pop().unwrap_or(0) + 1;
                continue;
            }
            ',' | ':' => {
                depth -= levels[top];
                levels[top] = 0;
                continue;
            }
            '.' | '|' | '&' | '!' | '*' | '<' | '>' | '=' | '?' => {
                levels[top] += 1;
                depth += 1;
            }
            _ => continue,
        }
        if depth > limit {
            return Err(offset);
        }
    }
    Ok(())
}

fn check_calls(ast: &Ast) -> Result<(), String> {
    if let Ast::Function { name, args, offset } = ast {
        let (min, max) = if let Some((_, a)) = CUSTOM_ARITY.iter().find(|(n, _)| n == name) {
            (a.unwrap_or(0), *a)
        } else if let Some((_, min, max)) = BUILTIN_ARITY.iter().find(|(n, _, _)| n == name) {
            (*min, *max)
        } else {
            return Err(format!("unknown function {name}() (at character {})", offset + 1));
        };
        let n = args.len();
        if n < min || max.is_some_and(|m| n > m) {
            let expected = match max {
                Some(m) if m == min => format!("{m}"),
                Some(m) => format!("{min} to {m}"),
                None => format!("at least {min}"),
            };
            return Err(format!("{name}() takes {expected} argument(s), {n} given (at character {})", offset + 1));
        }
    }
    children(ast).into_iter().try_for_each(check_calls)
}

fn children(ast: &Ast) -> Vec<&Ast> {
    match ast {
        Ast::Comparison { lhs, rhs, .. }
        | Ast::Condition { predicate: lhs, then: rhs, .. }
        | Ast::Subexpr { lhs, rhs, .. }
        | Ast::And { lhs, rhs, .. }
        | Ast::Or { lhs, rhs, .. }
        | Ast::Projection { lhs, rhs, .. } => vec![lhs, rhs],
        Ast::Expref { ast, .. }
        | Ast::Flatten { node: ast, .. }
        | Ast::Not { node: ast, .. }
        | Ast::ObjectValues { node: ast, .. } => {
            vec![ast]
        }
        Ast::Function { args, .. } | Ast::MultiList { elements: args, .. } => args.iter().collect(),
        Ast::MultiHash { elements, .. } => elements.iter().map(|kv| &kv.value).collect(),
        _ => vec![],
    }
}

/// Evaluates against an already converted variable. `Expression::search` would re-encode the
/// variable through serde on every call (the crate's non-nightly `ToJmespath`), which cost more
/// than the evaluation itself.
pub fn search(expr: &Expression, data: &Rcvar) -> Result<Rcvar, JmespathError> {
    let mut ctx = Context::new(expr.as_str(), runtime());
    jmespath::interpret(data, expr.as_ast(), &mut ctx)
}

/// A message as a JMESPath variable, converted directly (not through serde).
pub fn from_json(v: &Value) -> Rcvar {
    Rcvar::new(match v {
        Value::Null => Variable::Null,
        Value::Bool(b) => Variable::Bool(*b),
        Value::Number(n) => Variable::Number(n.clone()),
        Value::String(s) => Variable::String(s.clone()),
        Value::Array(a) => Variable::Array(a.iter().map(from_json).collect()),
        Value::Object(o) => Variable::Object(o.iter().map(|(k, v)| (k.clone(), from_json(v))).collect()),
    })
}

/// A JMESPath result as JSON (expression references, which have no JSON form, become null).
pub fn to_json(v: &Variable) -> Value {
    match v {
        Variable::Null | Variable::Expref(_) => Value::Null,
        Variable::Bool(b) => Value::Bool(*b),
        Variable::Number(n) => Value::Number(n.clone()),
        Variable::String(s) => Value::String(s.clone()),
        Variable::Array(a) => Value::Array(a.iter().map(|v| to_json(v)).collect()),
        Variable::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
    }
}

/// A one-line account of a JMESPath error, without the crate's multi-line caret rendering.
pub fn describe(e: &JmespathError) -> String {
    let what = match &e.reason {
        ErrorReason::Parse(m) => m.clone(),
        ErrorReason::Runtime(r) => r.to_string(),
    };
    format!("{what} (at character {})", e.offset + 1)
}

fn fail(ctx: &Context<'_>, message: String) -> JmespathError {
    JmespathError::from_ctx(ctx, ErrorReason::Parse(message))
}

#[derive(Clone, Copy)]
enum Num {
    Int(i64),
    Float(f64),
}

fn num(v: &Rcvar) -> Num {
    match &**v {
        Variable::Number(n) => match n.as_i64() {
            Some(i) => Num::Int(i),
            None => Num::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        _ => Num::Float(f64::NAN),
    }
}

fn float(n: Num) -> f64 {
    match n {
        Num::Int(i) => i as f64,
        Num::Float(f) => f,
    }
}

fn number(ctx: &Context<'_>, f: f64) -> Result<Rcvar, JmespathError> {
    // An f64 holding a whole number inside i64 range is returned as an integer only when the
    // inputs were integers; callers decide. Here: a plain float, NaN/inf rejected.
    Number::from_f64(f)
        .map(|n| Rcvar::new(Variable::Number(n)))
        .ok_or_else(|| fail(ctx, format!("result {f} is not a finite number")))
}

fn int(i: i64) -> Rcvar {
    Rcvar::new(Variable::Number(Number::from(i)))
}

fn arith(name: &'static str) -> impl Fn(&[Rcvar], &mut Context<'_>) -> Result<Rcvar, JmespathError> + Send + Sync {
    move |args, ctx| {
        let (a, b) = (num(&args[0]), num(&args[1]));
        let overflow = || fail(ctx, format!("{name}() overflowed the 64-bit integer range"));
        match (name, a, b) {
            ("add", Num::Int(x), Num::Int(y)) => x.checked_add(y).map(int).ok_or_else(overflow),
            ("subtract", Num::Int(x), Num::Int(y)) => x.checked_sub(y).map(int).ok_or_else(overflow),
            ("multiply", Num::Int(x), Num::Int(y)) => x.checked_mul(y).map(int).ok_or_else(overflow),
            ("divide", _, b) if float(b) == 0.0 => Err(fail(ctx, "divide() by zero".into())),
            ("divide", Num::Int(x), Num::Int(y)) if x % y == 0 => x.checked_div(y).map(int).ok_or_else(overflow),
            ("pow", Num::Int(x), Num::Int(y)) if y >= 0 => {
                let y = u32::try_from(y).map_err(|_| overflow())?;
                x.checked_pow(y).map(int).ok_or_else(overflow)
            }
            ("add", a, b) => number(ctx, float(a) + float(b)),
            ("subtract", a, b) => number(ctx, float(a) - float(b)),
            ("multiply", a, b) => number(ctx, float(a) * float(b)),
            ("divide", a, b) => number(ctx, float(a) / float(b)),
            (_, a, b) => number(ctx, float(a).powf(float(b))),
        }
    }
}

fn insert_string(args: &[Rcvar], ctx: &mut Context<'_>) -> Result<Rcvar, JmespathError> {
    let original = args[0].as_string().cloned().unwrap_or_default();
    let to_insert = args[1].as_string().cloned().unwrap_or_default();
    let Num::Int(pos) = num(&args[2]) else {
        return Err(fail(ctx, "insertString() position must be an integer".into()));
    };
    let chars = original.chars().count() as i64;
    if pos < 0 || pos > chars {
        return Err(fail(
            ctx,
            format!("insertString() position {pos} is outside 0..={chars} (the length of '{original}')"),
        ));
    }
    let byte = original.char_indices().nth(pos as usize).map_or(original.len(), |(b, _)| b);
    let mut s = original;
    s.insert_str(byte, &to_insert);
    Ok(Rcvar::new(Variable::String(s)))
}

fn from_unix(scale_ms: i64) -> impl Fn(&[Rcvar], &mut Context<'_>) -> Result<Rcvar, JmespathError> + Send + Sync {
    move |args, ctx| {
        let name = if scale_ms == 1 { "fromUnixTimestampMs" } else { "fromUnixTimestamp" };
        let Num::Int(t) = num(&args[0]) else {
            return Err(fail(ctx, format!("{name}() expects an integer")));
        };
        let ms = t.checked_mul(scale_ms).ok_or_else(|| fail(ctx, format!("{name}({t}) is out of range")))?;
        let dt = DateTime::<Utc>::from_timestamp_millis(ms)
            .ok_or_else(|| fail(ctx, format!("{name}({t}) is out of range")))?;
        Ok(Rcvar::new(Variable::String(dt.to_rfc3339_opts(SecondsFormat::AutoSi, true))))
    }
}

type Impl = Box<dyn Fn(&[Rcvar], &mut Context<'_>) -> Result<Rcvar, JmespathError> + Send + Sync>;

fn custom(name: &str) -> Box<CustomFunction> {
    let n = ArgumentType::Number;
    let s = ArgumentType::String;
    let (sig, f): (Vec<ArgumentType>, Impl) = match name {
        "add" => (vec![n.clone(), n], Box::new(arith("add"))),
        "subtract" => (vec![n.clone(), n], Box::new(arith("subtract"))),
        "multiply" => (vec![n.clone(), n], Box::new(arith("multiply"))),
        "divide" => (vec![n.clone(), n], Box::new(arith("divide"))),
        "pow" => (vec![n.clone(), n], Box::new(arith("pow"))),
        "insertString" => (vec![s.clone(), s, n], Box::new(insert_string)),
        "fromUnixTimestamp" => (vec![n], Box::new(from_unix(1000))),
        _ => (vec![n], Box::new(from_unix(1))),
    };
    Box::new(CustomFunction::new(Signature::new(sig, None), f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(expr: &str, data: serde_json::Value) -> Result<serde_json::Value, String> {
        let e = compile(expr)?;
        let r = search(&e, &from_json(&data)).map_err(|e| describe(&e))?;
        Ok(to_json(&r))
    }

    #[test]
    fn nesting_past_the_bound_is_refused_before_the_parser_recurses() {
        // Each of these overflowed a 2 MiB stack (a test thread's) when handed to the crate.
        for deep in [
            format!("{}a{}", "(".repeat(100_000), ")".repeat(100_000)),
            format!("{}a", "!".repeat(100_000)),
            format!("{}a", "&".repeat(100_000)),
            format!("a{}", ".a".repeat(100_000)),
            format!("a{}", "[*]".repeat(100_000)),
            format!("{}a{}", "[".repeat(100_000), "]".repeat(100_000)),
            format!("{}a{}", "{a:".repeat(100_000), "}".repeat(100_000)),
            format!("a{}", " || a".repeat(100_000)),
        ] {
            let e = compile(&deep).err().unwrap_or_default();
            assert!(e.contains("nests more than 64 deep"), "{}: {e}", &deep[..20]);
        }
        // Siblings do not add up, and quoted text counts nothing.
        let wide = format!("{{{}}}", (0..200).map(|i| format!("k{i}: Body.a.b.c")).collect::<Vec<_>>().join(", "));
        assert!(compile(&wide).is_ok());
        let quoted = format!("'{0}' == `\"{0}\"` && \"{0}\".x", "((([[[!!!...".repeat(50));
        assert!(compile(&quoted).is_ok(), "{:?}", compile(&quoted).err());
        assert_eq!(eval(&format!("{}a{}", "(".repeat(20), ")".repeat(20)), json!({"a": 1})), Ok(json!(1)));
        assert_eq!(eval(&format!("a{}", ".a".repeat(50)), json!({"a": 1})), Ok(json!(null)));
    }

    #[test]
    fn integer_arithmetic_stays_integer_and_checked() {
        assert_eq!(eval("add(`10`, `10`)", json!({})), Ok(json!(20)));
        assert_eq!(eval("subtract(l, r)", json!({"l": 40, "r": 50})), Ok(json!(-10)));
        assert_eq!(eval("multiply(l, r)", json!({"l": 40, "r": 50})), Ok(json!(2000)));
        assert!(eval("multiply(l, r)", json!({"l": i64::MAX, "r": 2})).is_err());
        assert!(eval("pow(l, r)", json!({"l": i64::MAX, "r": 10})).is_err());
    }

    #[test]
    fn divide_is_real_division_unless_exact() {
        assert_eq!(eval("divide(l, r)", json!({"l": 100, "r": 25})), Ok(json!(4)));
        assert_eq!(eval("divide(l, r)", json!({"l": 40, "r": 50})), Ok(json!(0.8)));
        let e = eval("divide(l, r)", json!({"l": 50, "r": 0})).expect_err("divide by zero");
        assert!(e.contains("by zero"), "{e}");
    }

    #[test]
    fn unknown_functions_and_wrong_arity_fail_at_compile_time() {
        assert!(compile("sort(a, b)").is_err());
        assert!(compile("fromUnixTimestamp()").is_err());
        assert!(compile("nosuch(a)").is_err());
        assert!(compile("length(to_array(@)[?a])").is_ok());
    }
}
