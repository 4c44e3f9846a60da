"""The clinicians' web pages, mounted at /referrals/ (config/urls.py)."""

from django.urls import path

from referrals import web

urlpatterns = [
    path("new/", web.referral_new, name="web-referral-new"),
    path("outgoing/", web.referral_outgoing_page, name="web-referral-outgoing"),
    path("worklist/", web.referral_worklist_page, name="web-referral-worklist"),
    path("<int:pk>/", web.referral_detail_page, name="web-referral-detail"),
    path("<int:pk>/messages/", web.referral_message, name="web-referral-message"),
    path("<int:pk>/actions/<slug:action>/", web.referral_action, name="web-referral-action"),
]
