from django.urls import path

from tenancy.console import views

app_name = "console"

urlpatterns = [
    path("", views.home, name="home"),
    path("login/", views.ConsoleLoginView.as_view(), name="login"),
    path("tenants/<slug:slug>/", views.tenant_detail, name="tenant"),
    path("logout/", views.ConsoleLogoutView.as_view(), name="logout"),
]
