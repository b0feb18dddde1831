from django.contrib import admin
from django.urls import path

from . import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("whoami/", views.whoami),
    path("record/", views.record),
    path("transfer/", views.transfer),
    path("inline-script/", views.inline_script),
    path("healthz/", views.health),
    path("media/<path:name>", views.private_media),
]
