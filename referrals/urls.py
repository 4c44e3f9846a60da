from django.urls import path

from referrals import apis

urlpatterns = [
    path("referrals/", apis.ReferralSubmitApi.as_view(), name="referral-submit"),
    path("referrals/outgoing/", apis.ReferralOutgoingApi.as_view(), name="referral-outgoing"),
    path("referrals/worklist/", apis.ReferralWorklistApi.as_view(), name="referral-worklist"),
    path("referrals/<int:pk>/", apis.ReferralDetailApi.as_view(), name="referral-detail"),
    *(
        path(f"referrals/<int:pk>/{action}/", view.as_view(), name=f"referral-{action}")
        for action, view in apis.ACTION_VIEWS.items()
    ),
]
