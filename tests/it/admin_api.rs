//! The admin API on the admin listener: off (404) without
//! `admin.api_token_file`; with it, only requests with the token get in,
//! and they manage tenants, users and sessions as the CLI does, audited
//! with `"by": "admin_api"` (a tenant token's with its name, and it
//! reaches its tenants alone); a session it revokes is refused by the
//! gateway at once. Never on the public listener.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{
    assert_error, assert_error_in, assert_invalid_token, both_backends, expect_json, spawn_app, spawn_app_in, TestApp,
    TestOptions, OTHER_PASSWORD, PASSWORD,
};
use crate::password_reset::audit_events;

const TOKEN: &str = "0123456789abcdef0123456789abcdef-admin";

async fn spawn() -> TestApp {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("admin.token"), format!("{TOKEN}\n")).expect("write the token");
    // A slow poll: a session the API revokes must be refused at once by
    // this gateway, not found by its next poll.
    let options = TestOptions {
        admin_extra: "api_token_file = \"admin.token\"".to_owned(),
        revocation_poll: "10m",
        auth_extra: "revocation_max_staleness = \"30m\"".to_owned(),
        ..TestOptions::default()
    };
    spawn_app_in(dir, options).await
}

const ACME_TOKEN: &str = "acme-console-0123456789abcdef0123456789";

/// A gateway with the admin token and a tenant token for `acme` alone.
async fn spawn_with_tenant_token() -> TestApp {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("admin.token"), format!("{TOKEN}\n")).expect("write the token");
    std::fs::write(dir.path().join("acme.token"), format!("{ACME_TOKEN}\n")).expect("write the token");
    let options = TestOptions {
        admin_extra: "api_token_file = \"admin.token\"\n\
                      tenant_tokens = [{ name = \"acme-console\", file = \"acme.token\", tenants = [\"acme\"], \
                      roles = [\"admin\"] }]"
            .to_owned(),
        revocation_poll: "10m",
        auth_extra: "revocation_max_staleness = \"30m\"".to_owned(),
        ..TestOptions::default()
    };
    spawn_app_in(dir, options).await
}

async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> reqwest::Response {
    let mut request = app.client.request(method, app.admin_url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.unwrap_or_else(|e| panic!("{path}: {e}"))
}

async fn admin(app: &TestApp, method: Method, path: &str, body: Option<Value>) -> reqwest::Response {
    call(app, method, path, Some(TOKEN), body).await
}

both_backends! {
    /// A token replaced in its file takes over at SIGHUP (what
    /// `reload_keys` does), the old one stops; a file removed (to revoke a
    /// leaked token) or holding another entry's token drops its entry's
    /// token, and the others still work.
    #[tokio::test]
    async fn a_token_replaced_in_its_file_takes_over_at_a_reload() {
        let app = spawn_with_tenant_token().await;
        app.create_tenant("acme").await;
        let list = |token: &'static str| call(&app, Method::GET, "/admin/tenants", Some(token), None);
        assert_eq!(list(TOKEN).await.status(), StatusCode::OK);
        const NEW: &str = "fedcba9876543210fedcba9876543210-rotated";
        std::fs::write(app.dir.path().join("admin.token"), format!("{NEW}\n")).expect("write the new token");
        assert_eq!(list(TOKEN).await.status(), StatusCode::OK, "nothing changes before the reload");
        app.reloader.reload_keys();
        assert_error(list(TOKEN).await, StatusCode::UNAUTHORIZED, "unauthorized").await;
        assert_eq!(list(NEW).await.status(), StatusCode::OK);
        assert_eq!(call(&app, Method::GET, "/admin/tenants/acme/users", Some(ACME_TOKEN), None).await.status(), StatusCode::OK);

        // The same token twice (a copy gone wrong): the entry that repeats
        // it has none.
        std::fs::write(app.dir.path().join("acme.token"), format!("{NEW}\n")).expect("write a duplicate");
        app.reloader.reload_keys();
        assert_eq!(list(NEW).await.status(), StatusCode::OK, "the admin token is the first entry's");
        let acme = call(&app, Method::GET, "/admin/tenants/acme/users", Some(ACME_TOKEN), None).await;
        assert_error(acme, StatusCode::UNAUTHORIZED, "unauthorized").await;

        // A file removed revokes its token; the others keep working.
        std::fs::write(app.dir.path().join("acme.token"), format!("{ACME_TOKEN}\n")).expect("write it back");
        app.reloader.reload_keys();
        let acme = call(&app, Method::GET, "/admin/tenants/acme/users", Some(ACME_TOKEN), None).await;
        assert_eq!(acme.status(), StatusCode::OK);
        std::fs::remove_file(app.dir.path().join("acme.token")).expect("remove the file");
        app.reloader.reload_keys();
        let acme = call(&app, Method::GET, "/admin/tenants/acme/users", Some(ACME_TOKEN), None).await;
        assert_error(acme, StatusCode::UNAUTHORIZED, "unauthorized").await;
        assert_eq!(list(NEW).await.status(), StatusCode::OK);
        app.stop().await;
    }

    #[tokio::test]
    async fn only_the_token_gets_in_and_never_on_the_public_listener() {
        let app = spawn().await;
        for (case, token) in [("none", None), ("wrong", Some("0123456789abcdef0123456789abcdef-admiN")), ("prefix", Some("0123456789abcdef"))] {
            let resp = call(&app, Method::GET, "/admin/tenants", token, None).await;
            assert_eq!(resp.headers().get("www-authenticate").map(|v| v.to_str().ok()), Some(Some("Bearer")), "{case}");
            assert_error(resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
        }
        // Every route, an unknown one and a wrong method are behind the token.
        let user = format!("/admin/tenants/default/users/{}", uuid::Uuid::new_v4());
        for (method, path) in [
            (Method::POST, "/admin/tenants".to_owned()),
            (Method::DELETE, user.clone()),
            (Method::POST, format!("{user}/password")),
            (Method::GET, "/admin/nothing".to_owned()),
            (Method::PUT, "/admin/tenants".to_owned()),
        ] {
            let resp = call(&app, method.clone(), &path, None, Some(json!({ "slug": "sneaky" }))).await;
            assert_error_in(&format!("{method} {path}"), resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
        }
        let wrong_method = admin(&app, Method::PUT, "/admin/tenants", None).await;
        assert_error(wrong_method, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
        let tenants = expect_json(admin(&app, Method::GET, "/admin/tenants", None).await, StatusCode::OK).await;
        assert_eq!(tenants.as_array().map(Vec::len), Some(1), "nothing was made without the token: {tenants}");
        assert_eq!(tenants[0]["slug"], "default", "{tenants}");
        for odd in ["/admin/tenants/%00/users", "/admin/tenants/NOT%20A%20SLUG/users"] {
            assert_error(admin(&app, Method::GET, odd, None).await, StatusCode::NOT_FOUND, "not_found").await;
        }
        // The public listener serves no admin path, with or without the token.
        let public = app.client.get(app.url("/admin/tenants")).bearer_auth(TOKEN).send().await.expect("GET");
        assert_eq!(public.status(), StatusCode::NOT_FOUND);
        // Probes and metrics stay open to whoever reaches the admin listener.
        assert_eq!(call(&app, Method::GET, "/healthz", None, None).await.status(), StatusCode::OK);
        app.stop().await;
    }

    #[tokio::test]
    async fn an_operator_manages_tenants_users_and_sessions_over_http() {
        let app = spawn().await;
        let made = admin(&app, Method::POST, "/admin/tenants", Some(json!({ "slug": "acme", "name": "Acme" }))).await;
        let made = expect_json(made, StatusCode::CREATED).await;
        assert_eq!((made["slug"].as_str(), made["disabled"].as_bool()), (Some("acme"), Some(false)), "{made}");
        let again = admin(&app, Method::POST, "/admin/tenants", Some(json!({ "slug": "acme" }))).await;
        assert_error(again, StatusCode::CONFLICT, "tenant_exists").await;
        let bad = admin(&app, Method::POST, "/admin/tenants", Some(json!({ "slug": "Not A Slug" }))).await;
        let error = assert_error(bad, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert!(error["message"].as_str().is_some_and(|m| m.starts_with("slug:")), "{error}");

        let new_user = json!({ "email": "Ops@Acme.example", "password": PASSWORD, "roles": ["admin"], "scopes": ["orders:read"] });
        let user = expect_json(admin(&app, Method::POST, "/admin/tenants/acme/users", Some(new_user.clone())).await, StatusCode::CREATED).await;
        assert_eq!(user["email"], "ops@acme.example", "{user}");
        assert_eq!((user["roles"].clone(), user["email_verified"].clone()), (json!(["admin"]), json!(true)), "{user}");
        assert!(user.get("password").is_none() && !user.to_string().contains(PASSWORD), "{user}");
        let id = user["id"].as_str().expect("an id").to_owned();
        let taken = admin(&app, Method::POST, "/admin/tenants/acme/users", Some(new_user)).await;
        assert_error(taken, StatusCode::CONFLICT, "email_taken").await;
        let weak = json!({ "email": "weak@acme.example", "password": "short" });
        assert_error(admin(&app, Method::POST, "/admin/tenants/acme/users", Some(weak)).await, StatusCode::BAD_REQUEST, "weak_password").await;
        let listed = expect_json(admin(&app, Method::GET, "/admin/tenants/acme/users", None).await, StatusCode::OK).await;
        assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
        let path = |rest: &str| format!("/admin/tenants/acme/users/{id}{rest}");

        // A session the API revokes is refused by this gateway at once.
        let tokens = app.login_ok("ops@acme.example", PASSWORD, Some("acme")).await;
        let sessions = expect_json(admin(&app, Method::GET, &path("/sessions"), None).await, StatusCode::OK).await;
        assert_eq!(sessions.as_array().map(Vec::len), Some(1), "{sessions}");
        let revoked = admin(&app, Method::DELETE, &path("/sessions"), None).await;
        assert_eq!(expect_json(revoked, StatusCode::OK).await["sessions_revoked"], 1);
        assert_invalid_token(app.get_authed("/auth/me", &tokens.access_token).await).await;

        for body in [json!({}), json!({ "role": ["admin"] })] {
            let refused = admin(&app, Method::POST, &path("/revoke"), Some(body.clone())).await;
            assert_error_in(&body.to_string(), refused, StatusCode::BAD_REQUEST, "invalid_request").await;
        }
        let granted = admin(&app, Method::POST, &path("/grant"), Some(json!({ "scopes": ["orders:write"] }))).await;
        assert_eq!(expect_json(granted, StatusCode::OK).await["scopes"], json!(["orders:read", "orders:write"]));
        let tokens = app.login_ok("ops@acme.example", PASSWORD, Some("acme")).await;
        let removed = admin(&app, Method::POST, &path("/revoke"), Some(json!({ "roles": ["admin"] }))).await;
        let removed = expect_json(removed, StatusCode::OK).await;
        assert_eq!((removed["roles"].clone(), removed["sessions_revoked"].clone()), (json!([]), json!(1)), "{removed}");
        assert_invalid_token(app.get_authed("/auth/me", &tokens.access_token).await).await;

        let set = admin(&app, Method::POST, &path("/password"), Some(json!({ "password": OTHER_PASSWORD }))).await;
        assert_eq!(set.status(), StatusCode::OK);
        let tokens = app.login_ok("ops@acme.example", OTHER_PASSWORD, Some("acme")).await;
        let one = expect_json(admin(&app, Method::GET, &path("/sessions"), None).await, StatusCode::OK).await;
        let session = one[0]["id"].as_str().expect("a session id").to_owned();
        let gone = admin(&app, Method::DELETE, &format!("/admin/tenants/acme/sessions/{session}"), None).await;
        assert_eq!(gone.status(), StatusCode::NO_CONTENT);
        assert_invalid_token(app.get_authed("/auth/me", &tokens.access_token).await).await;
        let twice = admin(&app, Method::DELETE, &format!("/admin/tenants/acme/sessions/{session}"), None).await;
        assert_error(twice, StatusCode::NOT_FOUND, "not_found").await;

        let moved = admin(&app, Method::POST, &path("/email"), Some(json!({ "new_email": "Lead@Acme.example" }))).await;
        assert_eq!(expect_json(moved, StatusCode::OK).await["email"], "lead@acme.example");
        let reset = expect_json(admin(&app, Method::POST, &path("/reset-token"), None).await, StatusCode::OK).await;
        let body = json!({ "token": reset["token"], "new_password": PASSWORD });
        let redeemed = app.client.post(app.url("/auth/password/reset")).json(&body).send().await.expect("POST");
        assert_eq!(redeemed.status(), StatusCode::NO_CONTENT, "the token works");
        let set = admin(&app, Method::POST, &path("/password"), Some(json!({ "password": OTHER_PASSWORD }))).await;
        assert_eq!(set.status(), StatusCode::OK);

        assert_eq!(admin(&app, Method::POST, &path("/disable"), None).await.status(), StatusCode::OK);
        let disabled = app.login("lead@acme.example", OTHER_PASSWORD, Some("acme")).await;
        assert_error(disabled, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        assert_eq!(admin(&app, Method::POST, &path("/enable"), None).await.status(), StatusCode::NO_CONTENT);
        app.login_ok("lead@acme.example", OTHER_PASSWORD, Some("acme")).await;

        let tokens = app.login_ok("lead@acme.example", OTHER_PASSWORD, Some("acme")).await;
        let disabled = admin(&app, Method::POST, "/admin/tenants/acme/disable", None).await;
        assert_eq!(expect_json(disabled, StatusCode::OK).await["sessions_revoked"], 2, "this login's and the one before");
        assert_invalid_token(app.get_authed("/auth/me", &tokens.access_token).await).await;
        let twice = admin(&app, Method::POST, "/admin/tenants/acme/disable", None).await;
        assert_error(twice, StatusCode::BAD_REQUEST, "invalid_request").await;
        let tenants = expect_json(admin(&app, Method::GET, "/admin/tenants", None).await, StatusCode::OK).await;
        let acme = tenants.as_array().expect("a list").iter().find(|t| t["slug"] == "acme").cloned().expect("acme");
        assert_eq!(acme["disabled"], true, "{acme}");
        assert_eq!(admin(&app, Method::POST, "/admin/tenants/acme/enable", None).await.status(), StatusCode::NO_CONTENT);

        let bad_query = admin(&app, Method::DELETE, &path("?forget=yes"), None).await;
        assert_error(bad_query, StatusCode::BAD_REQUEST, "invalid_request").await;
        let deleted = admin(&app, Method::DELETE, &path("?forget=true"), None).await;
        assert_eq!(deleted.status(), StatusCode::OK);
        assert_error(admin(&app, Method::GET, &path(""), None).await, StatusCode::NOT_FOUND, "not_found").await;
        for unknown in ["/admin/tenants/nope/users", "/admin/tenants/acme/users/not-a-uuid", "/admin/nothing"] {
            assert_error(admin(&app, Method::GET, unknown, None).await, StatusCode::NOT_FOUND, "not_found").await;
        }

        // Audited like the CLI's changes, and said to come from the API.
        for event in ["tenant_created", "user_created", "access_granted", "access_revoked", "password_reset", "email_changed", "user_disabled", "user_deleted", "tenant_disabled"] {
            let events = audit_events(&app, event).await;
            assert_eq!(events.first().map(|e| e["detail"]["by"].clone()), Some(json!("admin_api")), "{event}: {events:?}");
        }
        let all = app.cli(&["audit", "list", "--json", "--limit", "200"], "").await.expect("audit list");
        assert!(!all.contains(PASSWORD) && !all.contains(OTHER_PASSWORD) && !all.contains(TOKEN), "no secret is audited");
        app.stop().await;
    }

    #[tokio::test]
    async fn a_deleted_user_is_forgotten_over_http() {
        let app = spawn().await;
        let new_user = json!({ "email": "Gone@Example.com", "password": PASSWORD });
        let user = admin(&app, Method::POST, "/admin/tenants/default/users", Some(new_user)).await;
        let id = expect_json(user, StatusCode::CREATED).await["id"].as_str().expect("an id").to_owned();
        app.login_ok("gone@example.com", PASSWORD, None).await;
        let forget = format!("/admin/tenants/default/users/{id}/forget");
        let former = json!({ "email": "gone@example.com" });

        let alive = admin(&app, Method::POST, &forget, Some(former.clone())).await;
        let error = assert_error(alive, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert!(error["message"].as_str().is_some_and(|m| m.starts_with("id:")), "a live user is not forgotten: {error}");
        let deleted = admin(&app, Method::DELETE, &format!("/admin/tenants/default/users/{id}"), None).await;
        assert_eq!(expect_json(deleted, StatusCode::OK).await["sessions_revoked"], 1);

        let typo = admin(&app, Method::POST, &forget, Some(json!({ "email": "gnoe@example.com" }))).await;
        let error = assert_error(typo, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert!(error["message"].as_str().is_some_and(|m| m.starts_with("email:")), "{error}");
        let unknown = format!("/admin/tenants/default/users/{}/forget", uuid::Uuid::new_v4());
        assert_error(admin(&app, Method::POST, &unknown, Some(former.clone())).await, StatusCode::NOT_FOUND, "not_found").await;
        let extra = admin(&app, Method::POST, &forget, Some(json!({ "email": "gone@example.com", "all": true }))).await;
        assert_error(extra, StatusCode::BAD_REQUEST, "invalid_request").await;

        let named = app.cli(&["audit", "list", "--json", "--email", "gone@example.com"], "").await.expect("audit list");
        assert!(named.lines().count() >= 3, "created, logged in, deleted: {named}");
        let erased = expect_json(admin(&app, Method::POST, &forget, Some(former)).await, StatusCode::OK).await;
        assert!(erased["events_erased"].as_u64().is_some_and(|n| n >= 3), "{erased}");
        let named = app.cli(&["audit", "list", "--json", "--email", "gone@example.com"], "").await.expect("audit list");
        assert!(!named.contains("gone@example.com"), "no event names the address any more: {named}");
        let forgotten = audit_events(&app, "user_forgotten").await;
        assert_eq!(forgotten.len(), 1, "{forgotten:?}");
        assert_eq!((forgotten[0]["user_id"].as_str(), forgotten[0]["detail"]["by"].as_str()), (Some(id.as_str()), Some("admin_api")));
        app.stop().await;
    }

    /// A tenant's console gets a token of its own: it manages that tenant's
    /// users and sessions, sees no other tenant (404, as if there were
    /// none), and cannot make, disable or enable tenants (403).
    #[tokio::test]
    async fn a_tenant_token_reaches_its_tenants_users_and_nothing_else() {
        let app = spawn_with_tenant_token().await;
        for slug in ["acme", "other"] {
            let made = admin(&app, Method::POST, "/admin/tenants", Some(json!({ "slug": slug }))).await;
            assert_eq!(made.status(), StatusCode::CREATED);
        }
        let theirs = json!({ "email": "them@other.example", "password": PASSWORD });
        let theirs = admin(&app, Method::POST, "/admin/tenants/other/users", Some(theirs)).await;
        let theirs = expect_json(theirs, StatusCode::CREATED).await["id"].as_str().expect("an id").to_owned();
        let acme = |method: Method, path: String, body: Option<Value>| {
            let app = &app;
            async move { call(app, method, &path, Some(ACME_TOKEN), body).await }
        };

        let listed = expect_json(acme(Method::GET, "/admin/tenants".into(), None).await, StatusCode::OK).await;
        let slugs: Vec<&str> = listed.as_array().expect("a list").iter().filter_map(|t| t["slug"].as_str()).collect();
        assert_eq!(slugs, ["acme"], "{listed}");
        let global = [
            (Method::POST, "/admin/tenants", Some(json!({ "slug": "mine" }))),
            (Method::POST, "/admin/tenants/acme/disable", None),
            (Method::POST, "/admin/tenants/acme/enable", None),
            (Method::POST, "/admin/tenants/other/disable", None),
        ];
        for (method, path, body) in global {
            assert_error_in(path, acme(method, path.into(), body).await, StatusCode::FORBIDDEN, "forbidden").await;
        }
        let elsewhere = [
            (Method::GET, "/admin/tenants/other/users".to_owned()),
            (Method::GET, format!("/admin/tenants/other/users/{theirs}")),
            (Method::POST, format!("/admin/tenants/other/users/{theirs}/disable")),
            (Method::DELETE, format!("/admin/tenants/other/users/{theirs}/sessions")),
            (Method::GET, format!("/admin/tenants/acme/users/{theirs}")),
            (Method::GET, "/admin/tenants/default/users".to_owned()),
        ];
        for (method, path) in elsewhere {
            assert_error_in(&path, acme(method, path.clone(), None).await, StatusCode::NOT_FOUND, "not_found").await;
        }
        let them = app.login_ok("them@other.example", PASSWORD, Some("other")).await;
        app.me_ok(&them.access_token).await;

        let mine = json!({ "email": "ops@acme.example", "password": PASSWORD, "roles": ["admin"] });
        let mine = expect_json(acme(Method::POST, "/admin/tenants/acme/users".into(), Some(mine)).await, StatusCode::CREATED).await;
        let id = mine["id"].as_str().expect("an id").to_owned();
        // Only the roles and scopes its entry lists.
        let root = json!({ "email": "root@acme.example", "password": PASSWORD, "roles": ["root"] });
        let root = acme(Method::POST, "/admin/tenants/acme/users".into(), Some(root)).await;
        assert_error(root, StatusCode::FORBIDDEN, "forbidden").await;
        let grant = acme(Method::POST, format!("/admin/tenants/acme/users/{id}/grant"), Some(json!({ "scopes": ["all"] }))).await;
        assert_error(grant, StatusCode::FORBIDDEN, "forbidden").await;
        // Another tenant's session is none of its business, even by id.
        let sessions = admin(&app, Method::GET, &format!("/admin/tenants/other/users/{theirs}/sessions"), None).await;
        let session = expect_json(sessions, StatusCode::OK).await[0]["id"].as_str().expect("a session").to_owned();
        let cross = acme(Method::DELETE, format!("/admin/tenants/acme/sessions/{session}"), None).await;
        assert_error(cross, StatusCode::NOT_FOUND, "not_found").await;
        app.me_ok(&them.access_token).await;
        // Forgetting erases events no tenant holds: not for a tenant token.
        let forget = acme(Method::DELETE, format!("/admin/tenants/acme/users/{id}?forget=true"), None).await;
        assert_error(forget, StatusCode::FORBIDDEN, "forbidden").await;
        let forget = acme(Method::POST, format!("/admin/tenants/acme/users/{id}/forget"), Some(json!({ "email": "x@y.z" }))).await;
        assert_error(forget, StatusCode::FORBIDDEN, "forbidden").await;

        let tokens = app.login_ok("ops@acme.example", PASSWORD, Some("acme")).await;
        let revoked = acme(Method::DELETE, format!("/admin/tenants/acme/users/{id}/sessions"), None).await;
        assert_eq!(expect_json(revoked, StatusCode::OK).await["sessions_revoked"], 1);
        assert_invalid_token(app.get_authed("/auth/me", &tokens.access_token).await).await;
        let created = audit_events(&app, "user_created").await;
        assert_eq!(created[0]["detail"]["by"], "admin_api:acme-console", "{created:?}");
        assert!(created.iter().any(|e| e["email"] == "them@other.example" && e["detail"]["by"] == "admin_api"), "{created:?}");

        // A tenant the operator disabled is closed to its token.
        assert_eq!(admin(&app, Method::POST, "/admin/tenants/acme/disable", None).await.status(), StatusCode::OK);
        let closed = acme(Method::GET, "/admin/tenants/acme/users".into(), None).await;
        assert_error(closed, StatusCode::FORBIDDEN, "forbidden").await;

        let wrong = call(&app, Method::GET, "/admin/tenants/acme/users", Some("acme-console-0123456789abcdef012345678X"), None).await;
        assert_error(wrong, StatusCode::UNAUTHORIZED, "unauthorized").await;
        app.stop().await;
    }
}

/// Tenant tokens alone turn the API on, for their tenants only; a
/// read-only one reads and changes nothing.
#[tokio::test]
async fn tenant_tokens_alone_turn_the_api_on() {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("acme.token"), format!("{ACME_TOKEN}\n")).expect("write the token");
    std::fs::write(dir.path().join("desk.token"), "support-desk-0123456789abcdef0123456789\n").expect("write");
    let options = TestOptions {
        admin_extra: "tenant_tokens = [{ name = \"acme-console\", file = \"acme.token\", tenants = [\"default\"] }, \
                      { name = \"desk\", file = \"desk.token\", tenants = [\"default\"], read_only = true }]"
            .to_owned(),
        ..TestOptions::default()
    };
    let app = spawn_app_in(dir, options).await;
    let listed =
        expect_json(call(&app, Method::GET, "/admin/tenants", Some(ACME_TOKEN), None).await, StatusCode::OK).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    let made = call(&app, Method::POST, "/admin/tenants", Some(ACME_TOKEN), Some(json!({ "slug": "x" }))).await;
    assert_error(made, StatusCode::FORBIDDEN, "forbidden").await;
    assert_error(
        call(&app, Method::GET, "/admin/tenants", Some(TOKEN), None).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;

    let desk = Some("support-desk-0123456789abcdef0123456789");
    let user = json!({ "email": "seen@example.com", "password": PASSWORD });
    let user = call(&app, Method::POST, "/admin/tenants/default/users", Some(ACME_TOKEN), Some(user)).await;
    let id = expect_json(user, StatusCode::CREATED).await["id"].as_str().expect("an id").to_owned();
    let listed =
        expect_json(call(&app, Method::GET, "/admin/tenants/default/users", desk, None).await, StatusCode::OK).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    let path = format!("/admin/tenants/default/users/{id}");
    expect_json(call(&app, Method::GET, &format!("{path}/sessions"), desk, None).await, StatusCode::OK).await;
    for (method, path) in [
        (Method::POST, format!("{path}/disable")),
        (Method::DELETE, path.clone()),
        (Method::DELETE, format!("{path}/sessions")),
    ] {
        assert_error_in(&path, call(&app, method, &path, desk, None).await, StatusCode::FORBIDDEN, "forbidden").await;
    }
    let made = call(
        &app,
        Method::POST,
        "/admin/tenants/default/users",
        desk,
        Some(json!({ "email": "x@example.com", "password": PASSWORD })),
    )
    .await;
    assert_error(made, StatusCode::FORBIDDEN, "forbidden").await;
    app.stop().await;
}

#[tokio::test]
async fn two_tokens_alike_stop_the_start_naming_the_setting() {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("admin.token"), format!("{TOKEN}\n")).expect("write the token");
    std::fs::write(dir.path().join("acme.token"), format!("{TOKEN}\n")).expect("write the token");
    let options = TestOptions {
        admin_extra: "api_token_file = \"admin.token\"\n\
                      tenant_tokens = [{ name = \"acme-console\", file = \"acme.token\", tenants = [\"acme\"] }]"
            .to_owned(),
        ..TestOptions::default()
    };
    let config = crate::helpers::write_config(dir.path(), &options);
    let out = crate::helpers::run_binary(&config, &["serve"]).await;
    assert!(!out.status.success(), "the start fails");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("admin.tenant_tokens[0].file") && stderr.contains("the same token"), "{stderr}");
    assert!(!stderr.contains(TOKEN), "the token is not quoted: {stderr}");
}

/// A path whose percent-escapes are no UTF-8 names nothing: a JSON 404,
/// never axum's plain-text 400.
#[tokio::test]
async fn a_path_that_does_not_decode_is_a_json_404() {
    let app = spawn().await;
    let id = uuid::Uuid::new_v4();
    for path in [
        "/admin/tenants/%FF/users".to_owned(),
        "/admin/tenants/%FF%FE/disable".to_owned(),
        format!("/admin/tenants/default/users/%FF{id}"),
        "/admin/tenants/default/sessions/%C3%28".to_owned(),
    ] {
        let method = if path.ends_with("disable") { Method::POST } else { Method::GET };
        let method = if path.contains("/sessions/") { Method::DELETE } else { method };
        assert_error_in(&path, admin(&app, method, &path, None).await, StatusCode::NOT_FOUND, "not_found").await;
    }
    app.stop().await;
}

#[tokio::test]
async fn without_a_token_file_the_admin_api_is_off() {
    let app = spawn_app().await;
    for path in ["/admin", "/admin/tenants"] {
        let resp = call(&app, Method::GET, path, Some(TOKEN), None).await;
        assert_error(resp, StatusCode::NOT_FOUND, "not_found").await;
    }
    assert_eq!(call(&app, Method::GET, "/healthz", None, None).await.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn a_short_token_stops_the_start_naming_the_setting() {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("admin.token"), "too-short\n").expect("write the token");
    let options = TestOptions { admin_extra: "api_token_file = \"admin.token\"".to_owned(), ..TestOptions::default() };
    let config = crate::helpers::write_config(dir.path(), &options);
    let out = crate::helpers::run_binary(&config, &["serve"]).await;
    assert!(!out.status.success(), "the start fails");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("admin.api_token_file"), "{stderr}");
    assert!(!stderr.contains("too-short"), "the token is not quoted: {stderr}");
}
