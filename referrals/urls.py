from django.urls import path

from referrals import apis, attachments, notifications

urlpatterns = [
    path("referrals/", apis.ReferralSubmitApi.as_view(), name="referral-submit"),
    path("referrals/outgoing/", apis.ReferralOutgoingApi.as_view(), name="referral-outgoing"),
    path("referrals/worklist/", apis.ReferralWorklistApi.as_view(), name="referral-worklist"),
    path("referrals/<int:pk>/", apis.ReferralDetailApi.as_view(), name="referral-detail"),
    path(
        "referrals/<int:pk>/suggestions/",
        apis.ReferralSuggestionsApi.as_view(),
        name="referral-suggestions",
    ),
    *(
        path(f"referrals/<int:pk>/{action}/", view.as_view(), name=f"referral-{action}")
        for action, view in apis.ACTION_VIEWS.items()
    ),
    path(
        "referrals/<int:pk>/attachments/",
        attachments.ReferralAttachmentsApi.as_view(),
        name="referral-attachments",
    ),
    path(
        "referrals/<int:pk>/attachments/<int:aid>/",
        attachments.ReferralAttachmentDownloadApi.as_view(),
        name="referral-attachment-download",
    ),
    path("notifications/", notifications.NotificationListApi.as_view(), name="notifications"),
    path(
        "notifications/<int:pk>/read/",
        notifications.NotificationReadApi.as_view(),
        name="notification-read",
    ),
]
