//! Test fixtures: builder constructors for `DeepSeekDeployment`s and an in-process API server
//! double.
//!
//! [`FakeApiServer`] answers the kube client through `tower-test`'s mock service pair, keeps
//! objects in memory and logs every call, so tests can run `reconcile` repeatedly and check both
//! the resulting objects and which writes were made. It serves get, list (with equality label
//! selectors), server-side apply (create or replace the applied fields, keeping status),
//! status apply, create, replace (with resourceVersion conflicts), delete and delete-collection.
//! It does not serve watches: tests call `reconcile` directly, as kube-rs's controller-rs does.
//! [`FakeApiServer::run_statefulsets`] plays the StatefulSet controller and kubelet.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::client::Body;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::api::{DeepSeekDeployment, DeepSeekDeploymentSpec, ModelSpec};
use crate::controller::Context;
use crate::metrics::Metrics;

/// Namespace of every fixture.
pub const NS: &str = "serving";

impl DeepSeekDeployment {
    /// A small CPU deployment: `builtin://tiny`, EP 2 on CPU (2 pods per group), 1 group.
    pub fn test() -> Self {
        let spec: DeepSeekDeploymentSpec = serde_json::from_value(json!({
            "model": { "source": "builtin://tiny" },
            "parallelism": { "expertParallel": 2, "gpusPerPod": 0 },
        }))
        .expect("fixture spec");
        let mut d = DeepSeekDeployment::new("tiny", spec);
        d.metadata.namespace = Some(NS.into());
        d.metadata.uid = Some("0b7a1f4e-5d2c-4c1a-9a43-1f6f0d2f7e01".into());
        d.metadata.generation = Some(1);
        d
    }

    /// The full model: EP 16 over two 8-GPU pods, from a pinned hub revision.
    pub fn full() -> Self {
        let mut d = Self::test();
        d.metadata.name = Some("v32".into());
        d.spec.model = ModelSpec {
            source: "hf://deepseek-ai/DeepSeek-V3.2@main".into(),
            credentials_secret: Some("hf-token".into()),
            served_name: None,
            download_size_limit: d.spec.model.download_size_limit.clone(),
        };
        d.spec.parallelism.expert_parallel = 16;
        d.spec.parallelism.gpus_per_pod = 8;
        d
    }

    /// With `spec.replicas` set.
    pub fn with_replicas(mut self, n: i32) -> Self {
        self.spec.replicas = n;
        self
    }

    /// With a spec change applied and the generation bumped, as the API server would.
    pub fn edited(mut self, f: impl FnOnce(&mut DeepSeekDeploymentSpec)) -> Self {
        f(&mut self.spec);
        self.metadata.generation = Some(self.metadata.generation.unwrap_or(1) + 1);
        self
    }
}

/// One request the fake served.
#[derive(Clone, Debug)]
pub struct Call {
    /// HTTP method.
    pub method: Method,
    /// Path without the query.
    pub path: String,
    /// Query string.
    pub query: String,
}

impl Call {
    /// True for anything but GET.
    pub fn is_write(&self) -> bool {
        self.method != Method::GET
    }
}

#[derive(Default)]
struct Store {
    /// Objects by collection path (`/api/v1/namespaces/ns/pods`) and name.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    calls: Vec<Call>,
    /// Writes to paths containing this text are answered with 500.
    fail_writes_to: Option<String>,
    /// Requests to paths containing this text are answered with 404, as for a resource type
    /// the server does not serve (a CRD not installed).
    not_served: Option<String>,
    resource_version: u64,
    uid: u64,
}

/// In-memory API server; see the module docs.
#[derive(Clone, Default)]
pub struct FakeApiServer {
    store: Arc<Mutex<Store>>,
}

/// Collection path of a namespaced kind.
pub fn collection<K: Resource<DynamicType = ()>>(ns: &str) -> String {
    let plural = K::plural(&());
    let group = K::group(&());
    let version = K::version(&());
    if group.is_empty() {
        format!("/api/{version}/namespaces/{ns}/{plural}")
    } else {
        format!("/apis/{group}/{version}/namespaces/{ns}/{plural}")
    }
}

fn status_body(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    })
}

fn selector_matches(selector: &str, obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').unwrap_or((term, ""));
        labels.get(k).and_then(Value::as_str) == Some(v)
    })
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 3 <= bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8(out).expect("utf-8 query")
}

/// Splits `/api[s]/.../namespaces/NS/PLURAL[/NAME[/SUB]]` into collection, name, subresource.
fn split_path(path: &str) -> (String, Option<String>, Option<String>) {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let ns_at = parts
        .iter()
        .position(|p| *p == "namespaces")
        .expect("namespaced path");
    let coll_end = ns_at + 3;
    let collection = parts[..coll_end.min(parts.len())].join("/");
    let name = parts.get(coll_end).map(|s| s.to_string());
    let sub = parts.get(coll_end + 1).map(|s| s.to_string());
    (collection, name, sub)
}

impl Store {
    fn next_rv(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    fn admit_new(&mut self, obj: &mut Value, name: &str, ns: &str) {
        self.uid += 1;
        let rv = self.next_rv();
        let meta = obj["metadata"].as_object_mut().expect("metadata");
        meta.insert("name".into(), json!(name));
        meta.insert("namespace".into(), json!(ns));
        meta.insert("uid".into(), json!(format!("uid-{}", self.uid)));
        meta.insert("resourceVersion".into(), json!(rv));
        meta.insert("generation".into(), json!(1));
        meta.insert("creationTimestamp".into(), json!("2026-01-01T00:00:00Z"));
    }

    fn handle(
        &mut self,
        method: Method,
        path: &str,
        query: &str,
        content_type: &str,
        body: &[u8],
    ) -> (StatusCode, Value) {
        self.calls.push(Call {
            method: method.clone(),
            path: path.to_string(),
            query: query.to_string(),
        });
        if method != Method::GET
            && self
                .fail_writes_to
                .as_deref()
                .is_some_and(|f| path.contains(f))
        {
            let code = StatusCode::INTERNAL_SERVER_ERROR;
            return (code, status_body(code, "InternalError", "injected failure"));
        }
        if self.not_served.as_deref().is_some_and(|f| path.contains(f)) {
            let code = StatusCode::NOT_FOUND;
            let message = "the server could not find the requested resource";
            return (code, status_body(code, "NotFound", message));
        }
        let (coll, name, sub) = split_path(path);
        let ns = coll.split('/').nth_back(1).unwrap_or_default().to_string();
        let selector = query_param(query, "labelSelector").unwrap_or_default();
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(body).expect("JSON body")
        };
        let items = self.objects.entry(coll.clone()).or_default();
        match (method, name) {
            (Method::GET, None) => {
                let list: Vec<Value> = items
                    .values()
                    .filter(|o| selector_matches(&selector, o))
                    .cloned()
                    .collect();
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": self.resource_version.to_string()}, "items": list}),
                )
            }
            (Method::GET, Some(n)) => match items.get(&n) {
                Some(o) => (StatusCode::OK, o.clone()),
                None => (
                    StatusCode::NOT_FOUND,
                    status_body(StatusCode::NOT_FOUND, "NotFound", &format!("{n} not found")),
                ),
            },
            (Method::PATCH, Some(n)) => {
                let apply = content_type.contains("apply-patch");
                let existing = items.get(&n).cloned();
                let result = match (existing, sub.as_deref()) {
                    (None, Some(_)) => {
                        return (
                            StatusCode::NOT_FOUND,
                            status_body(
                                StatusCode::NOT_FOUND,
                                "NotFound",
                                &format!("{n} not found"),
                            ),
                        );
                    }
                    (None, None) => {
                        if !apply {
                            return (
                                StatusCode::NOT_FOUND,
                                status_body(
                                    StatusCode::NOT_FOUND,
                                    "NotFound",
                                    &format!("{n} not found"),
                                ),
                            );
                        }
                        let mut obj = body.clone();
                        if obj.get("metadata").is_none() {
                            obj["metadata"] = json!({});
                        }
                        self.admit_new(&mut obj, &n, &ns);
                        obj
                    }
                    (Some(mut cur), Some(_status)) => {
                        let new_status = body.get("status").cloned().unwrap_or(Value::Null);
                        if cur.get("status") != Some(&new_status) {
                            cur["status"] = new_status;
                            cur["metadata"]["resourceVersion"] = json!(self.next_rv());
                        }
                        cur
                    }
                    (Some(cur), None) => {
                        let mut next = if apply {
                            body.clone()
                        } else {
                            merge_patch(cur.clone(), &body)
                        };
                        for k in [
                            "uid",
                            "resourceVersion",
                            "generation",
                            "creationTimestamp",
                            "namespace",
                            "name",
                            "deletionTimestamp",
                        ] {
                            if let Some(v) = cur["metadata"].get(k) {
                                next["metadata"][k] = v.clone();
                            }
                        }
                        if let Some(s) = cur.get("status") {
                            next["status"] = s.clone();
                        }
                        if next != cur {
                            if next.get("spec") != cur.get("spec") {
                                let g = cur["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                                next["metadata"]["generation"] = json!(g);
                            }
                            next["metadata"]["resourceVersion"] = json!(self.next_rv());
                        }
                        next
                    }
                };
                self.objects
                    .get_mut(&coll)
                    .expect("collection")
                    .insert(n, result.clone());
                (StatusCode::OK, result)
            }
            (Method::POST, None) => {
                let mut obj = body;
                let name = obj["metadata"]["name"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("generated-{}", self.uid + 1));
                if items.contains_key(&name) {
                    return (
                        StatusCode::CONFLICT,
                        status_body(
                            StatusCode::CONFLICT,
                            "AlreadyExists",
                            &format!("{name} already exists"),
                        ),
                    );
                }
                self.admit_new(&mut obj, &name, &ns);
                self.objects
                    .get_mut(&coll)
                    .expect("collection")
                    .insert(name, obj.clone());
                (StatusCode::CREATED, obj)
            }
            (Method::PUT, Some(n)) => {
                let Some(cur) = items.get(&n).cloned() else {
                    return (
                        StatusCode::NOT_FOUND,
                        status_body(StatusCode::NOT_FOUND, "NotFound", &format!("{n} not found")),
                    );
                };
                if body["metadata"]["resourceVersion"] != cur["metadata"]["resourceVersion"] {
                    return (
                        StatusCode::CONFLICT,
                        status_body(
                            StatusCode::CONFLICT,
                            "Conflict",
                            "the object has been modified",
                        ),
                    );
                }
                let mut next = body;
                next["metadata"]["resourceVersion"] = json!(self.next_rv());
                self.objects
                    .get_mut(&coll)
                    .expect("collection")
                    .insert(n, next.clone());
                (StatusCode::OK, next)
            }
            (Method::DELETE, Some(n)) => match items.remove(&n) {
                Some(o) => (StatusCode::OK, o),
                None => (
                    StatusCode::NOT_FOUND,
                    status_body(StatusCode::NOT_FOUND, "NotFound", &format!("{n} not found")),
                ),
            },
            (Method::DELETE, None) => {
                let gone: Vec<String> = items
                    .iter()
                    .filter(|(_, o)| selector_matches(&selector, o))
                    .map(|(k, _)| k.clone())
                    .collect();
                let removed: Vec<Value> = gone.iter().filter_map(|k| items.remove(k)).collect();
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": removed}),
                )
            }
            (m, n) => panic!("fake API server does not serve {m} {path} ({n:?})"),
        }
    }
}

fn merge_patch(mut target: Value, patch: &Value) -> Value {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                target = json!({});
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    let cur = t.remove(k).unwrap_or(Value::Null);
                    t.insert(k.clone(), merge_patch(cur, v));
                }
            }
            target
        }
        other => other.clone(),
    }
}

impl FakeApiServer {
    /// A kube client wired to this fake. Requests are served on a spawned task.
    pub fn client(&self) -> Client {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let store = self.store.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let method = req.method().clone();
                let path = req.uri().path().to_string();
                let query = req.uri().query().unwrap_or_default().to_string();
                let ct = req
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let body = req.into_body().collect_bytes().await.expect("request body");
                let (code, value) = store
                    .lock()
                    .expect("store")
                    .handle(method, &path, &query, &ct, &body);
                let resp = Response::builder()
                    .status(code)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Body::from(serde_json::to_vec(&value).expect("json")))
                    .expect("response");
                send.send_response(resp);
            }
        });
        Client::new(svc, NS)
    }

    /// A controller context on this fake, with its own metrics registry.
    pub fn context(&self) -> Arc<Context> {
        Arc::new(Context::new(
            self.client(),
            Arc::new(Metrics::default()),
            Some("test".into()),
        ))
    }

    /// Answers writes to paths containing `fragment` with 500 from now on (`None` stops it).
    pub fn fail_writes_to(&self, fragment: Option<&str>) {
        self.store.lock().expect("store").fail_writes_to = fragment.map(str::to_string);
    }

    /// Answers requests to paths containing `fragment` with 404 from now on, as a server
    /// without that CRD does (`None` serves everything again).
    pub fn not_serving(&self, fragment: Option<&str>) {
        self.store.lock().expect("store").not_served = fragment.map(str::to_string);
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.store.lock().expect("store").calls.clone()
    }

    /// Writes made since call number `from`.
    pub fn writes_since(&self, from: usize) -> Vec<Call> {
        self.calls()
            .into_iter()
            .skip(from)
            .filter(Call::is_write)
            .collect()
    }

    /// Stores an object as if created by someone else.
    pub fn insert<K: Resource<DynamicType = ()> + Serialize>(&self, obj: &K) {
        let ns = obj.meta().namespace.clone().unwrap_or_else(|| NS.into());
        let name = obj.meta().name.clone().expect("name");
        let mut v = serde_json::to_value(obj).expect("json");
        v["apiVersion"] = json!(K::api_version(&()));
        v["kind"] = json!(K::kind(&()));
        let mut s = self.store.lock().expect("store");
        if v["metadata"].get("uid").is_none() {
            s.admit_new(&mut v, &name, &ns);
        }
        s.objects
            .entry(collection::<K>(&ns))
            .or_default()
            .insert(name, v);
    }

    /// All objects of a kind in [`NS`].
    pub fn list<K: Resource<DynamicType = ()> + DeserializeOwned>(&self) -> Vec<K> {
        let s = self.store.lock().expect("store");
        s.objects
            .get(&collection::<K>(NS))
            .map(|m| {
                m.values()
                    .map(|v| serde_json::from_value(v.clone()).expect("typed"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// One object of a kind in [`NS`].
    pub fn get<K: Resource<DynamicType = ()> + DeserializeOwned>(&self, name: &str) -> Option<K> {
        self.list::<K>().into_iter().find(|o| o.name_any() == name)
    }

    /// Names of the objects of a kind in [`NS`], sorted.
    pub fn names<K: Resource<DynamicType = ()> + DeserializeOwned>(&self) -> Vec<String> {
        self.list::<K>().iter().map(ResourceExt::name_any).collect()
    }

    /// Plays the StatefulSet controller and the kubelet: removes pods whose StatefulSet is gone
    /// and creates the missing pods of every StatefulSet from its template, Running and Ready.
    pub fn run_statefulsets(&self) {
        let sets: Vec<StatefulSet> = self.list();
        let owners: Vec<String> = sets.iter().map(ResourceExt::name_any).collect();
        for pod in self.list::<Pod>() {
            let owner = pod
                .name_any()
                .rsplit_once('-')
                .map(|(a, _)| a.to_string())
                .unwrap_or_default();
            if !owners.contains(&owner) {
                self.remove::<Pod>(&pod.name_any());
            }
        }
        for sts in sets {
            for ordinal in 0..sts.spec.replicas.unwrap_or(1) {
                let name = format!("{}-{ordinal}", sts.name_any());
                if self.get::<Pod>(&name).is_some() {
                    continue;
                }
                let template = sts.spec.template.clone();
                let mut labels = template.metadata.and_then(|m| m.labels).unwrap_or_default();
                labels.insert(crate::render::RANK_LABEL.into(), ordinal.to_string());
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": { "name": name, "namespace": NS, "labels": labels },
                    "spec": template.spec,
                    "status": {
                        "phase": "Running",
                        "conditions": [{ "type": "Ready", "status": "True" }],
                        "containerStatuses": [{
                            "name": "engine", "ready": true, "restartCount": 0, "image": "engine",
                            "imageID": "", "started": true
                        }],
                    },
                }))
                .expect("pod");
                self.insert(&pod);
            }
        }
    }

    /// Changes a stored pod.
    pub fn edit_pod(&self, name: &str, f: impl FnOnce(&mut Pod)) {
        let mut pod: Pod = self.get(name).expect("pod exists");
        f(&mut pod);
        self.insert(&pod);
    }

    /// Removes an object.
    pub fn remove<K: Resource<DynamicType = ()>>(&self, name: &str) {
        let mut s = self.store.lock().expect("store");
        if let Some(m) = s.objects.get_mut(&collection::<K>(NS)) {
            m.remove(name);
        }
    }

    /// The stored `DeepSeekDeployment`, as the controller would receive it from its watch.
    pub fn deployment(&self, name: &str) -> DeepSeekDeployment {
        self.get(name).expect("deployment stored")
    }
}
