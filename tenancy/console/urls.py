from django.urls import path

from tenancy.console import keys, logs, otp, tenants, upstreams, views

app_name = "console"

urlpatterns = [
    path("", views.home, name="home"),
    path("login/", views.ConsoleLoginView.as_view(), name="login"),
    path("login/code/", otp.login_code, name="login-otp"),
    path("logout/", views.ConsoleLogoutView.as_view(), name="logout"),
    path("security/", otp.security, name="security"),
    path("security/disable/", otp.security_disable, name="security-disable"),
    # tenants, members, keys
    path("tenants/", tenants.tenant_list, name="tenants"),
    path("tenants/new/", tenants.tenant_new, name="tenant-new"),
    path("tenants/<slug:slug>/", tenants.tenant_detail, name="tenant"),
    path("tenants/<slug:slug>/edit/", tenants.tenant_edit, name="tenant-edit"),
    path("tenants/<slug:slug>/suspend/", tenants.tenant_suspend, name="tenant-suspend"),
    path("tenants/<slug:slug>/resume/", tenants.tenant_resume, name="tenant-resume"),
    path("tenants/<slug:slug>/members/add/", tenants.member_new, name="member-add"),
    path("tenants/<slug:slug>/members/<int:member_id>/role/", tenants.member_role, name="member-role"),
    path("tenants/<slug:slug>/members/<int:member_id>/remove/", tenants.member_delete, name="member-remove"),
    path("tenants/<slug:slug>/keys/", keys.key_list, name="keys"),
    path("tenants/<slug:slug>/keys/new/", keys.key_new, name="key-new"),
    path("tenants/<slug:slug>/keys/<int:key_id>/", keys.key_detail, name="key"),
    path("tenants/<slug:slug>/keys/<int:key_id>/rotate/", keys.key_rotate, name="key-rotate"),
    path("tenants/<slug:slug>/keys/<int:key_id>/revoke/", keys.key_revoke, name="key-revoke"),
    # upstreams and models (operators)
    path("pools/", upstreams.pool_list, name="pools"),
    path("pools/<slug:name>/", upstreams.pool_detail, name="pool"),
    path("pools/<slug:name>/delete/", upstreams.pool_remove, name="pool-delete"),
    path("accounts/new/", upstreams.account_new, name="account-new"),
    path("accounts/<int:account_id>/", upstreams.account_detail, name="account"),
    path("accounts/<int:account_id>/enable/", upstreams.account_enable, name="account-enable"),
    path("accounts/<int:account_id>/disable/", upstreams.account_disable, name="account-disable"),
    path("accounts/<int:account_id>/test/", upstreams.account_test, name="account-test"),
    path("models/", upstreams.model_list, name="models"),
    path("models/routes/<int:route_id>/delete/", upstreams.route_remove, name="route-delete"),
    # logs and usage (read-only)
    path("requests/", logs.request_list, name="requests"),
    path("requests/<str:request_id>/", logs.request_detail, name="request"),
    path("audit/", logs.audit_list, name="audit"),
    path("usage/", logs.usage, name="usage"),
]
