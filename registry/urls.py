from rest_framework.routers import DefaultRouter

from registry import apis

router = DefaultRouter(trailing_slash=True)
router.register("countries", apis.CountryViewSet, basename="country")
router.register("areas", apis.AreaViewSet, basename="area")
router.register("specialties", apis.SpecialtyViewSet, basename="specialty")
router.register("facilities", apis.FacilityViewSet, basename="facility")
router.register("departments", apis.DepartmentViewSet, basename="department")
router.register("practitioners", apis.PractitionerViewSet, basename="practitioner")
router.register("endpoints", apis.EndpointViewSet, basename="endpoint")
router.register("support-links", apis.SupportLinkViewSet, basename="support-link")
router.register("change-requests", apis.ChangeRequestViewSet, basename="change-request")

urlpatterns = router.urls
