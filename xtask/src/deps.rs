//! The module dependency check: the top-level modules of `proxy/src` must
//! form a layered graph, with no import cycles between them.
//!
//! Rust accepts modules of one crate importing each other, so nothing in the
//! compiler stops cycles (`node` importing `outbound::serve` while `outbound`
//! imports `node::PodContext`) from coming back once they are untangled; each
//! one makes its modules changeable and testable only together. So `cargo
//! xtask test` derives the graph from the sources and fails on any cycle,
//! naming one place for each import that closes it.
//!
//! A hand-written scanner rather than `syn` keeps xtask's build small: it
//! blanks out comments and literals, splits the rest into identifiers and
//! punctuation, and reads `crate::<module>` paths (in `use` trees and inline)
//! off that. Test modules (`#[cfg(test)] mod tests { .. }`) are left out:
//! tests may reach anywhere without shaping the production layering.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

/// What to do about a cycle; part of the failure message.
const ADVICE: &str = "move the shared item into a lower module or pass it in; see ARCHITECTURE.md 'Module layering'";

/// Fails if the top-level modules of `proxy/src` import each other in a cycle.
pub fn check(workspace_root: &Path) -> Result<()> {
    let src = workspace_root.join("proxy/src");
    let modules = discover(&src)?;
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    let mut edges = Edges::new();
    for (module, files) in &modules {
        for file in files {
            let source = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            let shown = file.strip_prefix(workspace_root).unwrap_or(file).display().to_string();
            for import in imports(&source, &names) {
                if import.module == *module {
                    continue;
                }
                // Files and lines are visited in order, so the first site kept is the earliest.
                edges.entry((module.clone(), import.module)).or_insert(Site {
                    file: shown.clone(),
                    line: import.line,
                    path: import.path,
                });
            }
        }
    }
    check_graph(&names, &edges)?;
    eprintln!("xtask: module graph of proxy/src: {} modules, {} edges, no cycles", names.len(), edges.len());
    Ok(())
}

/// One `crate::<module>` path found in a source file.
#[derive(Debug)]
struct Import {
    /// The top-level module the path names.
    module: String,
    /// 1-based line of the module name.
    line: usize,
    /// The path as written, shortened (`crate::node::PodContext`, `crate::b::{..}`).
    path: String,
}

/// Where one dependency edge is made: the first import found for it.
#[derive(Debug)]
struct Site {
    file: String,
    line: usize,
    path: String,
}

/// Dependency edges (from, to), each with an example site.
type Edges = BTreeMap<(String, String), Site>;

/// Maps each top-level module of the crate in `src` to its files (sorted, so
/// the report is stable). `<name>.rs` and `<name>/**/*.rs` both belong to `name`.
fn discover(src: &Path) -> Result<BTreeMap<String, Vec<PathBuf>>> {
    let mut modules: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in fs::read_dir(src).with_context(|| format!("listing {}", src.display()))? {
        let path = entry.with_context(|| format!("listing {}", src.display()))?.path();
        let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
            continue;
        };
        if path.is_dir() {
            // `src/bin/` would hold separate binary crates, not modules of this one.
            if name == "bin" {
                continue;
            }
            let mut files = Vec::new();
            rust_files(&path, &mut files)?;
            if !files.is_empty() {
                modules.entry(name).or_default().extend(files);
            }
        } else if path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
            modules.entry(name).or_default().push(path);
        }
    }
    for files in modules.values_mut() {
        files.sort();
    }
    Ok(modules)
}

/// Collects the `.rs` files under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The `crate::<module>` paths in `source` that name one of `modules`, in
/// order, outside comments, literals and `#[cfg(test)]` modules. Paths to
/// items of the crate root (`crate::Error`) and `crate::{self}` are not modules.
fn imports(source: &str, modules: &BTreeSet<String>) -> Vec<Import> {
    let tokens = without_test_modules(tokenize(&strip(source)));
    crate_paths(&tokens).into_iter().filter(|i| modules.contains(&i.module)).collect()
}

/// Blanks out comments and string, byte-string, raw-string and char
/// literals, keeping newlines so line numbers still hold. What remains is
/// code only, where every brace is a real brace.
fn strip(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    while i < chars.len() {
        let end = match (chars[i], chars.get(i + 1).copied()) {
            ('/', Some('/')) => line_comment_end(&chars, i),
            ('/', Some('*')) => block_comment_end(&chars, i),
            ('"', _) => quoted_end(&chars, i + 1, '"'),
            ('r', _) if starts_token(&chars, i) => raw_string_end(&chars, i).unwrap_or(i),
            ('\'', _) => char_literal_end(&chars, i).unwrap_or(i),
            _ => i,
        };
        if end == i {
            out.push(chars[i]);
            i += 1;
        } else {
            out.extend(chars[i..end].iter().map(|&c| if c == '\n' { '\n' } else { ' ' }));
            i = end;
        }
    }
    out
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Whether the `r` at `i` can open a raw string: it starts a token, or
/// follows a `b` that does (`br"..."`). Otherwise it ends an identifier (`bar`).
fn starts_token(chars: &[char], i: usize) -> bool {
    let before = |k: usize| k.checked_sub(1).map(|p| chars[p]);
    match before(i) {
        None => true,
        Some('b') => before(i - 1).is_none_or(|c| !is_ident_char(c)),
        Some(c) => !is_ident_char(c),
    }
}

/// End (exclusive) of a `//` comment at `i`: the newline stays.
fn line_comment_end(chars: &[char], i: usize) -> usize {
    chars[i..].iter().position(|&c| c == '\n').map_or(chars.len(), |p| i + p)
}

/// End of a `/* */` comment at `i`; Rust block comments nest.
fn block_comment_end(chars: &[char], i: usize) -> usize {
    let mut depth = 0;
    let mut k = i;
    while k < chars.len() {
        match (chars[k], chars.get(k + 1).copied()) {
            ('/', Some('*')) => {
                depth += 1;
                k += 2;
            }
            ('*', Some('/')) => {
                depth -= 1;
                k += 2;
                if depth == 0 {
                    return k;
                }
            }
            _ => k += 1,
        }
    }
    chars.len()
}

/// End of a literal whose body starts at `k` and closes with `close`, with
/// backslash escapes (`"..."`, and `'...'` char literals).
fn quoted_end(chars: &[char], mut k: usize, close: char) -> usize {
    while k < chars.len() {
        match chars[k] {
            '\\' => k += 2,
            c if c == close => return k + 1,
            _ => k += 1,
        }
    }
    chars.len()
}

/// End of a raw string `r"..."` / `r#"..."#` at `i`, or `None` if the `r`
/// is not one (an identifier such as `r`, or a raw identifier `r#type`).
fn raw_string_end(chars: &[char], i: usize) -> Option<usize> {
    let hashes = chars[i + 1..].iter().take_while(|&&c| c == '#').count();
    let open = i + 1 + hashes;
    if chars.get(open) != Some(&'"') {
        return None;
    }
    let mut k = open + 1;
    while k < chars.len() {
        if chars[k] == '"' && chars[k + 1..].iter().take(hashes).filter(|&&c| c == '#').count() == hashes {
            return Some(k + 1 + hashes);
        }
        k += 1;
    }
    Some(chars.len())
}

/// End of a char literal at `i` (`'x'`, `'"'`, `'\''`, `'\u{..}'`), or
/// `None` for a lifetime or label (`'a`, `'static`), which has no closing
/// quote right after its first character.
fn char_literal_end(chars: &[char], i: usize) -> Option<usize> {
    match chars.get(i + 1) {
        Some('\\') => Some(quoted_end(chars, i + 1, '\'')),
        Some(_) if chars.get(i + 2) == Some(&'\'') => Some(i + 3),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
}

impl Token {
    /// Whether the token is spelled `text`.
    fn is(&self, text: &str) -> bool {
        match &self.tok {
            Tok::Ident(name) => name == text,
            Tok::PathSep => text == "::",
            Tok::Punct(c) => text.chars().eq(std::iter::once(*c)),
        }
    }

    fn is_punct(&self, c: char) -> bool {
        self.tok == Tok::Punct(c)
    }
}

/// Splits stripped source into identifiers (and number literals, which are
/// harmless here), `::` and single punctuation characters.
fn tokenize(code: &str) -> Vec<Token> {
    let chars: Vec<char> = code.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if is_ident_char(c) {
            let len = chars[i..].iter().take_while(|&&c| is_ident_char(c)).count();
            tokens.push(Token { tok: Tok::Ident(chars[i..i + len].iter().collect()), line });
            i += len;
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            tokens.push(Token { tok: Tok::PathSep, line });
            i += 2;
        } else {
            tokens.push(Token { tok: Tok::Punct(c), line });
            i += 1;
        }
    }
    tokens
}

/// Drops every `#[cfg(test)] mod <name> { .. }` (other attributes and a
/// visibility may sit between the `cfg` and the `mod`).
fn without_test_modules(tokens: Vec<Token>) -> Vec<Token> {
    let mut kept = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        match test_module_end(&tokens, i) {
            Some(end) => i = end,
            None => {
                kept.push(tokens[i].clone());
                i += 1;
            }
        }
    }
    kept
}

/// If a `#[cfg(test)]` attribute on an inline module starts at `i`, the
/// index just past the module's closing brace.
fn test_module_end(tokens: &[Token], i: usize) -> Option<usize> {
    const CFG_TEST: [&str; 7] = ["#", "[", "cfg", "(", "test", ")", "]"];
    let window = tokens.get(i..i + CFG_TEST.len())?;
    if !window.iter().zip(CFG_TEST).all(|(t, text)| t.is(text)) {
        return None;
    }
    let mut k = i + CFG_TEST.len();
    // Further attributes, e.g. `#[allow(..)]`.
    while tokens.get(k).is_some_and(|t| t.is("#")) && tokens.get(k + 1).is_some_and(|t| t.is("[")) {
        k = matching(tokens, k + 1, '[', ']')?;
    }
    if tokens.get(k).is_some_and(|t| t.is("pub")) {
        k += 1;
        if tokens.get(k).is_some_and(|t| t.is("(")) {
            k = matching(tokens, k, '(', ')')?;
        }
    }
    let is_inline_mod = tokens.get(k).is_some_and(|t| t.is("mod"))
        && tokens.get(k + 1).is_some_and(|t| matches!(t.tok, Tok::Ident(_)))
        && tokens.get(k + 2).is_some_and(|t| t.is("{"));
    if !is_inline_mod {
        return None;
    }
    matching(tokens, k + 2, '{', '}')
}

/// Index just past the `close` matching the `open` at `start`.
fn matching(tokens: &[Token], start: usize, open: char, close: char) -> Option<usize> {
    let mut depth = 0usize;
    for (k, t) in tokens.iter().enumerate().skip(start) {
        if t.is_punct(open) {
            depth += 1;
        } else if t.is_punct(close) {
            depth -= 1;
            if depth == 0 {
                return Some(k + 1);
            }
        }
    }
    None
}

/// Every `crate::<first segment>` path: inline ones and `use` trees, where
/// each element of a `crate::{..}` group is a path of its own.
fn crate_paths(tokens: &[Token]) -> Vec<Import> {
    let mut found = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if !t.is("crate") || tokens.get(i + 1).map(|t| &t.tok) != Some(&Tok::PathSep) {
            continue;
        }
        let Some(next) = tokens.get(i + 2) else { continue };
        match &next.tok {
            Tok::Ident(name) => found.push(Import {
                module: name.clone(),
                line: next.line,
                path: format!("crate::{}", render(tokens, i + 2)),
            }),
            Tok::Punct('{') => found.extend(group_heads(tokens, i + 2)),
            _ => {}
        }
    }
    found
}

/// The first segments of the elements of the `{..}` group opening at
/// `open`: identifiers right after the brace or a comma at the group's top
/// level (`crate::{a::X, b::{Y, Z}}` gives `a` and `b`).
fn group_heads(tokens: &[Token], open: usize) -> Vec<Import> {
    let mut heads = Vec::new();
    let mut depth = 0usize;
    for k in open..tokens.len() {
        match tokens[k].tok {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            Tok::Ident(ref name) if depth == 1 && (tokens[k - 1].is("{") || tokens[k - 1].is(",")) => {
                heads.push(Import {
                    module: name.clone(),
                    line: tokens[k].line,
                    path: format!("crate::{}", render(tokens, k)),
                });
            }
            _ => {}
        }
    }
    heads
}

/// The path starting at identifier `start`, for the report: its segments,
/// with a trailing group or glob shortened to `{..}` / `*`.
fn render(tokens: &[Token], start: usize) -> String {
    let mut path = String::new();
    let mut k = start;
    while let Some(Tok::Ident(name)) = tokens.get(k).map(|t| &t.tok) {
        path.push_str(name);
        if tokens.get(k + 1).map(|t| &t.tok) != Some(&Tok::PathSep) {
            break;
        }
        match tokens.get(k + 2).map(|t| &t.tok) {
            Some(Tok::Ident(_)) => {
                path.push_str("::");
                k += 2;
            }
            Some(Tok::Punct('{')) => {
                path.push_str("::{..}");
                break;
            }
            Some(Tok::Punct('*')) => {
                path.push_str("::*");
                break;
            }
            _ => break,
        }
    }
    path
}

/// Fails, naming every cycle and where its imports are, if `edges` has one.
fn check_graph(modules: &BTreeSet<String>, edges: &Edges) -> Result<()> {
    let components: Vec<BTreeSet<String>> =
        strongly_connected(modules, edges).into_iter().filter(|c| c.len() > 1).collect();
    if components.is_empty() {
        return Ok(());
    }
    let mut report = String::new();
    for component in &components {
        let members: Vec<&str> = component.iter().map(String::as_str).collect();
        let _ = writeln!(report, "modules that depend on each other: {}", members.join(", "));
        for cycle in covering_cycles(component, edges) {
            let _ = writeln!(report, "module dependency cycle: {}", cycle.join(" -> "));
            for pair in cycle.windows(2) {
                if let Some(site) = edges.get(&(pair[0].clone(), pair[1].clone())) {
                    let _ =
                        writeln!(report, "  {} -> {}: {}:{} ({})", pair[0], pair[1], site.file, site.line, site.path);
                }
            }
        }
    }
    bail!(
        "import cycles between the modules of proxy/src ({} modules, {} edges): {ADVICE}\n{}",
        modules.len(),
        edges.len(),
        report.trim_end()
    )
}

/// Tarjan's algorithm: the strongly connected components of the graph.
fn strongly_connected(modules: &BTreeSet<String>, edges: &Edges) -> Vec<BTreeSet<String>> {
    struct Tarjan<'a> {
        successors: BTreeMap<&'a str, Vec<&'a str>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        components: Vec<BTreeSet<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.successors.get(v).cloned().unwrap_or_default() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = BTreeSet::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.insert(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                self.components.push(component);
            }
        }
    }
    let mut tarjan = Tarjan {
        successors: successors(edges),
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        components: Vec::new(),
    };
    for v in modules {
        if !tarjan.index.contains_key(v.as_str()) {
            tarjan.visit(v);
        }
    }
    tarjan.components
}

fn successors(edges: &Edges) -> BTreeMap<&str, Vec<&str>> {
    let mut successors: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        successors.entry(from.as_str()).or_default().push(to.as_str());
    }
    successors
}

/// Cycles inside one component that together use every edge in it: for
/// each edge `u -> v`, `u -> v` then the shortest way back from `v` to `u`.
/// A component can hold exponentially many cycles; these are few and still
/// point at every import that has to go. Each starts at its smallest module.
fn covering_cycles(component: &BTreeSet<String>, edges: &Edges) -> Vec<Vec<String>> {
    let successors = successors(edges);
    let mut cycles = BTreeSet::new();
    for (u, v) in edges.keys().filter(|(u, v)| component.contains(u) && component.contains(v)) {
        let Some(back) = shortest_path(&successors, component, v, u) else { continue };
        let mut cycle: Vec<String> = std::iter::once(u.clone()).chain(back).collect();
        cycle.pop();
        let smallest = cycle.iter().enumerate().min_by_key(|(_, m)| *m).map_or(0, |(k, _)| k);
        cycle.rotate_left(smallest);
        let first = cycle[0].clone();
        cycle.push(first);
        cycles.insert(cycle);
    }
    // Shortest first: two modules importing each other are the plainest to untangle.
    let mut cycles: Vec<Vec<String>> = cycles.into_iter().collect();
    cycles.sort_by_key(Vec::len);
    cycles
}

/// Breadth-first shortest path `from ..= to`, staying inside `within`.
fn shortest_path(
    successors: &BTreeMap<&str, Vec<&str>>,
    within: &BTreeSet<String>,
    from: &str,
    to: &str,
) -> Option<Vec<String>> {
    let mut previous: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = VecDeque::from([from]);
    let mut seen = BTreeSet::from([from]);
    while let Some(v) = queue.pop_front() {
        if v == to {
            let mut path = vec![to.to_owned()];
            let mut at = to;
            while let Some(&p) = previous.get(at) {
                path.push(p.to_owned());
                at = p;
            }
            path.reverse();
            return Some(path);
        }
        for &w in successors.get(v).into_iter().flatten() {
            if within.contains(w) && seen.insert(w) {
                previous.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    fn targets(source: &str) -> Vec<(String, usize)> {
        let names = modules(&["a", "b", "c", "d", "e"]);
        imports(source, &names).into_iter().map(|i| (i.module, i.line)).collect()
    }

    fn edges(list: &[(&str, &str)]) -> Edges {
        list.iter()
            .enumerate()
            .map(|(k, (from, to))| {
                let site = Site { file: format!("proxy/src/{from}.rs"), line: k + 1, path: format!("crate::{to}") };
                (((*from).to_owned(), (*to).to_owned()), site)
            })
            .collect()
    }

    #[test]
    fn group_import_names_each_module() {
        let source = "use crate::{\n    a::X,\n    b::{Y, Z},\n    self,\n    Item,\n};\n";
        assert_eq!(targets(source), [("a".to_owned(), 2), ("b".to_owned(), 3)]);
    }

    #[test]
    fn nested_groups_only_count_their_head() {
        // `c` here is a submodule of `b`, not the top-level `c`.
        assert_eq!(targets("use crate::{b::{c::Y, d}};"), [("b".to_owned(), 1)]);
    }

    #[test]
    fn inline_path_counts() {
        let source = "fn f() {\n    let x = crate::c::f();\n}\n";
        assert_eq!(targets(source), [("c".to_owned(), 2)]);
    }

    #[test]
    fn comments_and_strings_do_not_count() {
        let source = r###"
            //! Uses crate::d for nothing.
            /// See crate::d::X.
            // crate::d
            /* crate::d /* nested crate::d */ still crate::d */
            const A: &str = "crate::d::x";
            const B: &str = r#"crate::d "quoted" crate::d"#;
            const C: &[u8] = br"crate::d";
            const Q: char = '"';
            const E: &str = "escaped \" crate::d";
            fn f<'a>(x: &'a str) -> &'a str { x }
        "###;
        assert_eq!(targets(source), []);
    }

    #[test]
    fn char_literal_quote_does_not_open_a_string() {
        let source = "let q = '\"';\nlet x = crate::a::f();\nlet e = '\\'';\nlet y = crate::b::g();\n";
        assert_eq!(targets(source), [("a".to_owned(), 2), ("b".to_owned(), 4)]);
    }

    #[test]
    fn lifetimes_are_not_char_literals() {
        let source = "fn f<'a, 'b>(x: &'a str) -> crate::a::T<'b> { crate::b::g(x) }";
        assert_eq!(targets(source), [("a".to_owned(), 1), ("b".to_owned(), 1)]);
    }

    #[test]
    fn test_modules_do_not_count() {
        let source = "use crate::a;\n#[cfg(test)]\nmod tests {\n    use crate::e;\n    fn f() { let _ = \"}\"; crate::e::g(); }\n}\nuse crate::b;\n";
        assert_eq!(targets(source), [("a".to_owned(), 1), ("b".to_owned(), 7)]);
    }

    #[test]
    fn other_cfg_test_items_count() {
        let source = "#[cfg(test)]\npub(crate) fn helper() { crate::a::f() }\n";
        assert_eq!(targets(source), [("a".to_owned(), 2)]);
    }

    #[test]
    fn items_that_are_not_modules_are_ignored() {
        assert_eq!(targets("use crate::{Error, VERSION};\nlet v = crate::VERSION;\npub(crate) fn f() {}"), []);
    }

    #[test]
    fn report_path_is_shortened() {
        let names = modules(&["a", "b"]);
        let paths: Vec<String> = imports("use crate::{a::X, b::{Y, Z}};", &names).into_iter().map(|i| i.path).collect();
        assert_eq!(paths, ["crate::a::X", "crate::b::{..}"]);
    }

    #[test]
    fn three_cycle_is_reported_with_its_members() {
        let names = modules(&["a", "b", "c", "d"]);
        let err = check_graph(&names, &edges(&[("b", "c"), ("a", "b"), ("c", "a"), ("c", "d")]))
            .expect_err("a -> b -> c -> a is a cycle")
            .to_string();
        assert!(err.contains("move the shared item into a lower module"), "{err}");
        assert!(err.contains("modules that depend on each other: a, b, c\n"), "{err}");
        assert!(err.contains("module dependency cycle: a -> b -> c -> a\n"), "{err}");
        assert!(err.contains("  a -> b: proxy/src/a.rs:2 (crate::b)"), "{err}");
        assert!(err.contains("  c -> a: proxy/src/c.rs:3 (crate::a)"), "{err}");
        assert!(!err.contains("-> d"), "d is not in the cycle: {err}");
    }

    #[test]
    fn separate_cycles_are_each_reported() {
        let names = modules(&["a", "b", "c", "d"]);
        let err = check_graph(&names, &edges(&[("a", "b"), ("b", "a"), ("c", "d"), ("d", "c"), ("b", "c")]))
            .expect_err("two cycles")
            .to_string();
        assert!(err.contains("module dependency cycle: a -> b -> a\n"), "{err}");
        assert!(err.contains("module dependency cycle: c -> d -> c"), "{err}");
    }

    #[test]
    fn every_edge_of_a_component_is_shown() {
        // One component, two cycles through `n`: both back edges must be named.
        let names = modules(&["n", "o", "p"]);
        let err = check_graph(&names, &edges(&[("n", "o"), ("o", "n"), ("n", "p"), ("p", "n")]))
            .expect_err("cycles")
            .to_string();
        assert!(err.contains("module dependency cycle: n -> o -> n"), "{err}");
        assert!(err.contains("module dependency cycle: n -> p -> n"), "{err}");
    }

    #[test]
    fn acyclic_graph_passes() {
        let names = modules(&["a", "b", "c", "d"]);
        check_graph(&names, &edges(&[("a", "b"), ("b", "c"), ("a", "c"), ("d", "a")])).expect("no cycle");
    }

    /// The real `proxy/src`; ignored because it checks the tree, not this code:
    /// `cargo test -p xtask -- --ignored real_tree --nocapture`.
    #[test]
    #[ignore]
    fn real_tree() {
        // Display, not Debug: the report is the point, not anyhow's backtrace.
        if let Err(e) = check(&crate::util::workspace_root()) {
            panic!("{e:#}");
        }
    }
}
