"""What Django concludes about a request: the facts a proxy gets wrong most often."""
from django.http import JsonResponse


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
