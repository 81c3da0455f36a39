use super::*;
use crate::model::{HttpRoute, ParentRef, RouteRule, ServiceKey, ValueMatch};

fn svc() -> ServiceKey {
    ServiceKey::new("shop", "cart")
}

fn rule(name: &str, matches: Vec<RouteMatch>) -> RouteRule {
    RouteRule { name: Some(name.into()), matches, ..RouteRule::default() }
}

fn route(name: &str, created: u64, rules: Vec<RouteRule>) -> Arc<HttpRoute> {
    Arc::new(HttpRoute {
        key: ServiceKey::new("shop", name),
        parents: vec![ParentRef { service: svc(), port: None }],
        rules,
        created,
    })
}

fn path(kind: &str, p: &str) -> RouteMatch {
    let path = match kind {
        "exact" => PathMatch::Exact(p.into()),
        "prefix" => PathMatch::Prefix(p.into()),
        _ => PathMatch::RegularExpression(p.into()),
    };
    RouteMatch { path: Some(path), ..RouteMatch::default() }
}

fn header(name: &str, value: &str) -> ValueMatch {
    ValueMatch { name: name.into(), value: StringMatch::Exact(value.into()) }
}

fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).expect("request").into_parts().0
}

fn label(table: &RouteTable, method: &str, uri: &str, headers: &[(&str, &str)]) -> Option<String> {
    table.find(&request(method, uri, headers)).map(|r| r.label.to_string())
}

/// Gateway API conformance HTTPRouteMatching / MatchingAcrossRoutes /
/// HeaderMatching / QueryParamMatching / MethodMatching, as one table.
#[test]
fn precedence_follows_the_gateway_api() {
    let routes = vec![
        route(
            "a",
            1,
            vec![
                rule("exact", vec![path("exact", "/")]),
                rule("v2", vec![path("prefix", "/v2")]),
                rule("v2-example", vec![path("prefix", "/v2/example")]),
                rule("regex", vec![path("regex", "/re/[0-9]+")]),
            ],
        ),
        route(
            "b",
            2,
            vec![
                rule("header", vec![RouteMatch { headers: vec![header("version", "two")], ..path("prefix", "/v2") }]),
                rule(
                    "two-headers",
                    vec![RouteMatch {
                        headers: vec![header("version", "two"), header("color", "orange")],
                        ..path("prefix", "/v2")
                    }],
                ),
                rule(
                    "query",
                    vec![RouteMatch {
                        query: vec![ValueMatch { name: "animal".into(), value: StringMatch::Exact("whale".into()) }],
                        ..RouteMatch::default()
                    }],
                ),
                rule("post", vec![RouteMatch { method: Some(http::Method::POST), ..path("prefix", "/v2") }]),
                rule("catch-all", vec![]),
            ],
        ),
        // Younger than "a" with the same match: "a" wins.
        route("c", 3, vec![rule("shadowed", vec![path("exact", "/")])]),
    ];
    let table = RouteTable::compile(&svc(), 80, &routes).expect("attached");
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("GET", "/", &[], "a/exact"),
        ("GET", "/v2", &[], "a/v2"),
        ("GET", "/v2/", &[], "a/v2"),
        ("GET", "/v2x", &[], "b/catch-all"),
        ("GET", "/v2/example", &[], "a/v2-example"),
        ("GET", "/v2/example/deeper", &[], "a/v2-example"),
        ("GET", "/v2/other", &[("version", "two")], "b/header"),
        ("GET", "/v2/other", &[("version", "two"), ("color", "orange")], "b/two-headers"),
        ("GET", "/v2/other", &[("version", "one")], "a/v2"),
        ("POST", "/v2/other", &[], "b/post"),
        ("GET", "/re/123", &[], "a/regex"),
        ("GET", "/re/12a", &[], "b/catch-all"),
        ("GET", "/anything?animal=whale", &[], "b/query"),
        ("GET", "/anything?animal=dolphin", &[], "b/catch-all"),
    ];
    let mut wrong = Vec::new();
    for (method, uri, headers, want) in cases {
        let got = label(&table, method, uri, headers);
        if got.as_deref() != Some(*want) {
            wrong.push(format!("{method} {uri} {headers:?}: {got:?}, want {want}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn header_names_are_case_insensitive_and_ports_select_routes() {
    let mut r = (*route(
        "a",
        1,
        vec![rule("h", vec![RouteMatch { headers: vec![header("X-Env", "canary")], ..RouteMatch::default() }])],
    ))
    .clone();
    r.parents[0].port = Some(8080);
    let routes = vec![Arc::new(r)];
    assert!(RouteTable::compile(&svc(), 80, &routes).is_none(), "attached to another port");
    let table = RouteTable::compile(&svc(), 8080, &routes).expect("attached");
    assert_eq!(label(&table, "GET", "/", &[("x-env", "canary")]).as_deref(), Some("a/h"));
    assert_eq!(label(&table, "GET", "/", &[("x-env", "Canary")]), None, "values match exactly");
}

#[test]
fn weights_split_and_zero_takes_nothing() {
    let backends = |w: [u32; 2]| {
        vec![
            BackendRef { service: ServiceKey::new("shop", "v1"), port: 80, weight: w[0] },
            BackendRef { service: ServiceKey::new("shop", "v2"), port: 80, weight: w[1] },
        ]
    };
    let rule = |w| Rule {
        label: "r".into(),
        filters: vec![],
        total_weight: 0,
        backends: backends(w),
        timeouts: Default::default(),
        retry: None,
        budget: Default::default(),
        rate_limiter: None,
    };
    let mut r = rule([90, 10]);
    r.total_weight = 100;
    let v2 =
        (0..10_000).filter(|_| matches!(r.pick_backend(), Pick::Backend(b) if b.service.name.as_ref() == "v2")).count();
    assert!((800..1200).contains(&v2), "10 % of 10 000: {v2}");
    let mut none = rule([0, 0]);
    none.total_weight = 0;
    assert_eq!(none.pick_backend(), Pick::Nowhere);
}
