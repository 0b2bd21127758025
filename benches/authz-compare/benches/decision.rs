//! Penny's in-process decision (tenant boundary + built-in and custom roles + wildcard
//! matcher) against casbin and cedar-policy evaluating the same policy. Before timing
//! anything, all three must agree on 10,000 random queries.
//!
//!   cargo bench --manifest-path benches/authz-compare/Cargo.toml

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::hint::black_box;
use std::str::FromStr;

use casbin::{CoreApi, DefaultModel, Enforcer, MemoryAdapter, MgmtApi};
use cedar_policy::{Authorizer, Context, Decision, Entities, EntityUid, PolicySet, Request};
use criterion::{Criterion, criterion_group, criterion_main};
use penny_authz::domain::decision::decide;
use penny_authz::domain::roles::{built_in, built_ins};
use penny_authz::domain::{Binding, Grant, Required, Role, Subject, SubjectKind};
use uuid::Uuid;

const RESOURCES: [&str; 9] = [
    "tenant",
    "user",
    "workspace",
    "billing",
    "conversation",
    "message",
    "file",
    "tool",
    "report",
];
const ACTIONS: [&str; 7] = [
    "read", "write", "delete", "upload", "execute", "invite", "export",
];
const TENANTS: usize = 10;
const USERS_PER_TENANT: usize = 30;
const QUERIES: usize = 10_000;

/// A small deterministic generator (xorshift): the same world on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

struct User {
    tenant: Uuid,
    id: String,
    roles: Vec<String>,
}

struct World {
    platform: Uuid,
    tenants: Vec<Uuid>,
    users: Vec<User>,
    /// Custom roles by tenant, by name.
    custom: HashMap<Uuid, HashMap<String, Role>>,
    /// Each user's bindings, by user index.
    bindings: Vec<Vec<Binding>>,
}

struct Query {
    tenant: Uuid,
    user: usize,
    resource: &'static str,
    action: &'static str,
}

fn world(rng: &mut Rng) -> World {
    let platform = Uuid::from_u128(1);
    let mut tenants = vec![platform];
    tenants.extend((0..TENANTS).map(|i| Uuid::from_u128(1000 + i as u128)));
    let mut custom = HashMap::new();
    let mut users = Vec::new();
    for &tenant in &tenants {
        let mut roles = HashMap::new();
        for c in 0..2 {
            let mut grants = Vec::new();
            for _ in 0..(2 + rng.below(3)) {
                let resource = RESOURCES[rng.below(RESOURCES.len())];
                let grant = if rng.below(4) == 0 {
                    Grant::Resource(resource.into())
                } else {
                    Grant::Exact(resource.into(), ACTIONS[rng.below(ACTIONS.len())].into())
                };
                if !grants.contains(&grant) {
                    grants.push(grant);
                }
            }
            let name = format!("custom{c}");
            roles.insert(
                name.clone(),
                Role {
                    tenant_id: Some(tenant),
                    name,
                    description: String::new(),
                    grants,
                    created_at: time::OffsetDateTime::UNIX_EPOCH,
                    updated_at: time::OffsetDateTime::UNIX_EPOCH,
                },
            );
        }
        custom.insert(tenant, roles);
        for u in 0..USERS_PER_TENANT {
            let choices = if tenant == platform {
                vec!["admin", "viewer", "custom0"]
            } else {
                vec!["owner", "member", "viewer", "custom0", "custom1"]
            };
            let mut roles: Vec<String> = Vec::new();
            for _ in 0..(1 + rng.below(2)) {
                let role = choices[rng.below(choices.len())].to_owned();
                if !roles.contains(&role) {
                    roles.push(role);
                }
            }
            // Some users hold nothing at all: deny by default must agree too.
            if rng.below(10) == 0 {
                roles.clear();
            }
            users.push(User {
                tenant,
                id: format!("u{u}"),
                roles,
            });
        }
    }
    let mut bindings = Vec::new();
    for user in &users {
        let subject = subject(user);
        let list: Vec<Binding> = user
            .roles
            .iter()
            .map(|role| Binding {
                id: Uuid::nil(),
                tenant_id: user.tenant,
                subject: subject.clone(),
                role: role.clone(),
                workspace_id: None,
                granter_id: String::new(),
                created_at: time::OffsetDateTime::UNIX_EPOCH,
            })
            .collect();
        bindings.push(list);
    }
    World {
        platform,
        tenants,
        users,
        custom,
        bindings,
    }
}

fn subject(user: &User) -> Subject {
    Subject {
        kind: SubjectKind::User,
        id: user.id.clone(),
        tenant_id: user.tenant,
    }
}

fn queries(world: &World, rng: &mut Rng) -> Vec<Query> {
    (0..QUERIES)
        .map(|_| {
            let user = rng.below(world.users.len());
            // Mostly the user's own tenant, sometimes another: the boundary must hold.
            let tenant = if rng.below(4) == 0 {
                world.tenants[rng.below(world.tenants.len())]
            } else {
                world.users[user].tenant
            };
            Query {
                tenant,
                user,
                resource: RESOURCES[rng.below(RESOURCES.len())],
                action: ACTIONS[rng.below(ACTIONS.len())],
            }
        })
        .collect()
}

/// Penny: what the authz service evaluates per check, the subject's bindings and the
/// tenant's roles already in memory (as its cache holds them).
struct Penny<'w> {
    world: &'w World,
    builtins: HashMap<String, Role>,
    subjects: Vec<Subject>,
    required: HashMap<(&'static str, &'static str), Required>,
}

impl<'w> Penny<'w> {
    fn new(world: &'w World) -> Self {
        let mut required = HashMap::new();
        for r in RESOURCES {
            for a in ACTIONS {
                required.insert((r, a), Required::parse(&format!("{r}:{a}")).unwrap());
            }
        }
        Self {
            world,
            builtins: built_ins()
                .into_iter()
                .map(|r| (r.name.clone(), r))
                .collect(),
            subjects: world.users.iter().map(subject).collect(),
            required,
        }
    }

    fn allowed(&self, q: &Query) -> bool {
        let user = &self.world.users[q.user];
        let subject = &self.subjects[q.user];
        // The service loads bindings of the requested tenant only: a foreign subject has none.
        let bindings: &[Binding] = if user.tenant == q.tenant {
            &self.world.bindings[q.user]
        } else {
            &[]
        };
        let custom = &self.world.custom[&q.tenant];
        decide(
            q.tenant,
            self.world.platform,
            subject,
            &self.required[&(q.resource, q.action)],
            None,
            bindings,
            |name| self.builtins.get(name).or_else(|| custom.get(name)),
        )
        .allowed()
    }
}

const CASBIN_MODEL: &str = r#"
[request_definition]
r = sub, dom, obj, act

[policy_definition]
p = sub, dom, obj, act

[role_definition]
g = _, _, _

[policy_effect]
e = some(where (p.eft == allow))

[matchers]
m = g(r.sub, p.sub, r.dom) && (p.dom == r.dom || p.dom == "*") && (p.obj == r.obj || p.obj == "*") && (p.act == r.act || p.act == "*")
"#;

fn grant_parts(grant: &Grant) -> (String, String) {
    match grant {
        Grant::All => ("*".into(), "*".into()),
        Grant::Resource(r) => (r.clone(), "*".into()),
        Grant::Exact(r, a) => (r.clone(), a.clone()),
    }
}

fn user_key(user: &User) -> String {
    format!("{}/{}", user.tenant, user.id)
}

fn role_key(tenant: Uuid, role: &str) -> String {
    if built_in(role).is_some() {
        role.to_owned()
    } else {
        format!("{tenant}/{role}")
    }
}

async fn casbin(world: &World) -> Enforcer {
    let model = DefaultModel::from_str(CASBIN_MODEL).await.unwrap();
    let mut enforcer = Enforcer::new(model, MemoryAdapter::default())
        .await
        .unwrap();
    let mut policies = Vec::new();
    for role in built_ins() {
        // admin exists only in the platform tenant; the other built-ins in every tenant.
        let dom = if role.name == "admin" {
            world.platform.to_string()
        } else {
            "*".to_owned()
        };
        for grant in &role.grants {
            let (obj, act) = grant_parts(grant);
            policies.push(vec![role.name.clone(), dom.clone(), obj, act]);
        }
    }
    for (tenant, roles) in &world.custom {
        for role in roles.values() {
            for grant in &role.grants {
                let (obj, act) = grant_parts(grant);
                policies.push(vec![
                    role_key(*tenant, &role.name),
                    tenant.to_string(),
                    obj,
                    act,
                ]);
            }
        }
    }
    enforcer.add_policies(policies).await.unwrap();
    let mut groupings = Vec::new();
    for user in &world.users {
        for role in &user.roles {
            groupings.push(vec![
                user_key(user),
                role_key(user.tenant, role),
                user.tenant.to_string(),
            ]);
        }
    }
    enforcer.add_grouping_policies(groupings).await.unwrap();
    enforcer
}

fn casbin_allowed(enforcer: &Enforcer, world: &World, q: &Query) -> bool {
    let user = &world.users[q.user];
    enforcer
        .enforce((user_key(user), q.tenant.to_string(), q.resource, q.action))
        .unwrap()
}

struct Cedar {
    authorizer: Authorizer,
    policies: PolicySet,
    entities: Entities,
    principals: Vec<EntityUid>,
    actions: HashMap<(&'static str, &'static str), EntityUid>,
    tenants: HashMap<Uuid, EntityUid>,
}

fn uid(text: &str) -> EntityUid {
    EntityUid::from_str(text).unwrap()
}

fn cedar_action(grant: &Grant) -> String {
    match grant {
        Grant::All => r#"Action::"*""#.to_owned(),
        Grant::Resource(r) => format!(r#"Action::"{r}:*""#),
        Grant::Exact(r, a) => format!(r#"Action::"{r}:{a}""#),
    }
}

fn cedar(world: &World) -> Cedar {
    let mut policies = String::new();
    for role in built_ins() {
        let resource = if role.name == "admin" {
            format!(r#"resource == Tenant::"{}""#, world.platform)
        } else {
            "resource".to_owned()
        };
        for grant in &role.grants {
            policies.push_str(&format!(
                r#"permit(principal in Role::"{}", action in {}, {resource}) when {{ principal.tenant == resource }};
"#,
                role.name,
                cedar_action(grant)
            ));
        }
    }
    for (tenant, roles) in &world.custom {
        for role in roles.values() {
            for grant in &role.grants {
                policies.push_str(&format!(
                    r#"permit(principal in Role::"{}", action in {}, resource == Tenant::"{tenant}") when {{ principal.tenant == resource }};
"#,
                    role_key(*tenant, &role.name),
                    cedar_action(grant)
                ));
            }
        }
    }
    let policies = PolicySet::from_str(&policies).unwrap();

    let mut entities = Vec::new();
    for tenant in &world.tenants {
        entities.push(serde_json_entity(
            &format!(r#"Tenant::"{tenant}""#),
            "{}",
            &[],
        ));
    }
    let mut roles: Vec<String> = built_ins().into_iter().map(|r| r.name).collect();
    for (tenant, custom) in &world.custom {
        roles.extend(custom.keys().map(|name| role_key(*tenant, name)));
    }
    for role in &roles {
        entities.push(serde_json_entity(&format!(r#"Role::"{role}""#), "{}", &[]));
    }
    for user in &world.users {
        let parents: Vec<String> = user
            .roles
            .iter()
            .map(|r| format!(r#"Role::"{}""#, role_key(user.tenant, r)))
            .collect();
        let attrs = format!(
            r#"{{"tenant": {{"__entity": {{"type": "Tenant", "id": "{}"}}}}}}"#,
            user.tenant
        );
        entities.push(serde_json_entity(
            &format!(r#"User::"{}""#, user_key(user)),
            &attrs,
            &parents,
        ));
    }
    entities.push(serde_json_entity(r#"Action::"*""#, "{}", &[]));
    let mut actions = HashMap::new();
    for r in RESOURCES {
        entities.push(serde_json_entity(
            &format!(r#"Action::"{r}:*""#),
            "{}",
            &[r#"Action::"*""#.to_owned()],
        ));
        for a in ACTIONS {
            let name = format!(r#"Action::"{r}:{a}""#);
            entities.push(serde_json_entity(
                &name,
                "{}",
                &[format!(r#"Action::"{r}:*""#)],
            ));
            actions.insert((r, a), uid(&name));
        }
    }
    let json = format!("[{}]", entities.join(","));
    let entities = Entities::from_json_str(&json, None).unwrap();
    Cedar {
        authorizer: Authorizer::new(),
        policies,
        entities,
        principals: world
            .users
            .iter()
            .map(|u| uid(&format!(r#"User::"{}""#, user_key(u))))
            .collect(),
        actions,
        tenants: world
            .tenants
            .iter()
            .map(|t| (*t, uid(&format!(r#"Tenant::"{t}""#))))
            .collect(),
    }
}

/// One entity in Cedar's JSON format; `parents` are `Type::"id"` strings.
fn serde_json_entity(uid_text: &str, attrs: &str, parents: &[String]) -> String {
    let split = |text: &str| {
        let (ty, id) = text.split_once("::").unwrap();
        format!(r#"{{"type": "{ty}", "id": {id}}}"#)
    };
    let parents: Vec<String> = parents.iter().map(|p| split(p)).collect();
    format!(
        r#"{{"uid": {}, "attrs": {attrs}, "parents": [{}]}}"#,
        split(uid_text),
        parents.join(",")
    )
}

fn cedar_allowed(cedar: &Cedar, q: &Query) -> bool {
    let request = Request::new(
        cedar.principals[q.user].clone(),
        cedar.actions[&(q.resource, q.action)].clone(),
        cedar.tenants[&q.tenant].clone(),
        Context::empty(),
        None,
    )
    .unwrap();
    cedar
        .authorizer
        .is_authorized(&request, &cedar.policies, &cedar.entities)
        .decision()
        == Decision::Allow
}

fn bench(c: &mut Criterion) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let world = world(&mut rng);
    let queries = queries(&world, &mut rng);
    let penny = Penny::new(&world);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let casbin = runtime.block_on(casbin(&world));
    let cedar = cedar(&world);

    // All three must agree before any of them is timed.
    let mut allowed = 0;
    for (i, q) in queries.iter().enumerate() {
        let (p, ca, ce) = (
            penny.allowed(q),
            casbin_allowed(&casbin, &world, q),
            cedar_allowed(&cedar, q),
        );
        assert!(
            p == ca && p == ce,
            "query {i} disagrees: penny {p}, casbin {ca}, cedar {ce}"
        );
        allowed += usize::from(p);
    }
    println!(
        "agreement: {} queries, {allowed} allowed, {} denied, identical in all three",
        queries.len(),
        queries.len() - allowed
    );

    let mut group = c.benchmark_group("decision");
    let mut i = 0usize;
    group.bench_function("penny", |b| {
        b.iter(|| {
            i = (i + 1) % queries.len();
            black_box(penny.allowed(black_box(&queries[i])))
        })
    });
    group.bench_function("casbin", |b| {
        b.iter(|| {
            i = (i + 1) % queries.len();
            black_box(casbin_allowed(&casbin, &world, black_box(&queries[i])))
        })
    });
    group.bench_function("cedar", |b| {
        b.iter(|| {
            i = (i + 1) % queries.len();
            black_box(cedar_allowed(&cedar, black_box(&queries[i])))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
