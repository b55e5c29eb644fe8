-- Argo CD health check for argoproj.io/Application: an Application's health is its own
-- status.health. Argo CD 1.8 removed the built-in one; without it an app of apps never waits
-- for a lower sync wave's Application to become Healthy, so waves would not order the chart
-- before the RembgServices. This is the check Argo CD's documentation gives
-- (docs/operator-manual/health.md, "Argo CD App").
hs = {}
hs.status = "Progressing"
hs.message = ""
if obj.status ~= nil then
  if obj.status.health ~= nil then
    hs.status = obj.status.health.status
    if obj.status.health.message ~= nil then
      hs.message = obj.status.health.message
    end
  end
end
return hs
