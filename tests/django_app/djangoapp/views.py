"""What Django concludes about a request: the facts a proxy gets wrong most often; a POST endpoint
that records each request it ran, so a test can prove no POST ran twice; and private media sent by the
proxy after a login check (X-Accel-Redirect, as django-sendfile2's nginx backend answers)."""
import mimetypes
import os

from django.contrib.auth.decorators import login_required
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt


def whoami(request):
    return JsonResponse(
        {
            "is_secure": request.is_secure(),
            "scheme": request.scheme,
            "host": request.get_host(),
            "absolute_uri": request.build_absolute_uri("/next/"),
            "remote_addr": request.META.get("REMOTE_ADDR"),
            "x_forwarded_for": request.META.get("HTTP_X_FORWARDED_FOR"),
        }
    )


@csrf_exempt
def record(request):
    """POST `id=…`: appends the id and this process's id to DJANGO_POST_LOG (one line per run)."""
    if request.method != "POST":
        return HttpResponse("POST only", status=405)
    line = f"{request.POST.get('id', '-')} {os.getpid()}\n"
    with open(os.environ["DJANGO_POST_LOG"], "a") as log:
        log.write(line)
    return HttpResponse("recorded")


def health(request):
    return HttpResponse("ok")


@login_required(login_url="/admin/login/")
def private_media(request, name):
    """The proxy's internal `/protected/` mount sends the file; Django only decides who may have it."""
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    response = HttpResponse(content_type=content_type)
    response["X-Accel-Redirect"] = f"/protected/{name}"
    response["Content-Disposition"] = f'attachment; filename="{os.path.basename(name)}"'
    return response


@csrf_exempt
def transfer(request):
    """A view Django's CSRF check does not guard (webhooks are written like this): only the proxy's
    cross-origin protection stands between it and another site's form."""
    if request.method != "POST":
        return HttpResponse("POST only", status=405)
    return HttpResponse(f"transferred to {request.POST.get('to', '-')}")


def inline_script(request):
    """A page with an inline script, which the proxy's default Content-Security-Policy blocks: the
    browser reports the violation to the proxy's collector."""
    return HttpResponse(
        "<!doctype html><html><head><title>inline</title></head><body>"
        "<script>document.title = 'the inline script ran';</script></body></html>"
    )
