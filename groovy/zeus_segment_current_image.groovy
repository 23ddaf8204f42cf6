/*
 * zeus_segment_current_image.groovy -- ask the local ZEUS service to pre-segment the open image.
 *
 * Written for QuPath 0.4, 0.5 and 0.6 (also runs on 0.7); needs Java 11+ (java.net.http), which
 * every QuPath >= 0.3 ships with.
 *
 * What it does:
 *   1. sends POST <SERVICE_URL> with the JSON
 *        {"slide": <path of the current image's file>, "region": <selected annotation as a GeoJSON
 *         geometry in level-0 px, only when one is selected and USE_SELECTION is true>,
 *         "model": ..., "prompts": ..., "threshold": ...}   (empty parameters are left out)
 *      and the header "Authorization: Bearer <token>" (TOKEN below, or the environment variable
 *      ZEUS_TOKEN); the service is started on this computer with `zeus serve`;
 *   2. reads the answer, a QuPath GeoJSON FeatureCollection of ZEUS annotations;
 *   3. applies the keep-edits rule (the same rule as bridge/edits.py in zeus-qupath): only untouched
 *      ZEUS annotations are replaced -- with a region, only those lying inside the region -- and
 *      every edited, renamed, reclassified or hand-drawn object is kept; a new object whose ID is
 *      already in the image is not added twice;
 *   4. adds the new annotations (save the image afterwards as usual).
 * A dialog explains what went wrong when the service is not running (connection refused) or
 * answers with an error ({"error": "..."}).
 *
 * Parameters (edit below):
 *   SERVICE_URL      the service endpoint (default http://127.0.0.1:8765/segment)
 *   TOKEN            '' = read the environment variable ZEUS_TOKEN
 *   MODEL, PROMPTS   '' = the service's defaults (e.g. MODEL = 'conch', PROMPTS = 'spindle_cell', or the
 *                    path of a prompt file in a folder the service was started with: --root FOLDER)
 *   THRESHOLD        null = the ZEUS rule; a number between 0 and 1 = probability threshold
 *   USE_SELECTION    true = segment only inside the selected annotation, if one is selected
 *   TIMEOUT_MINUTES  how long to wait for the answer
 */

import com.google.gson.JsonObject
import com.google.gson.JsonParser
import qupath.lib.io.GsonTools
import qupath.lib.io.PathIO
import qupath.lib.objects.PathObject

import java.net.http.HttpClient
import java.net.http.HttpRequest
import java.net.http.HttpResponse
import java.net.http.HttpTimeoutException
import java.nio.charset.StandardCharsets
import java.nio.file.Paths
import java.time.Duration

import static qupath.lib.scripting.QP.*

// ------------------------------------------------------------------------------------ parameters
String SERVICE_URL = 'http://127.0.0.1:8765/segment'
String TOKEN = ''
String MODEL = ''
String PROMPTS = ''
Double THRESHOLD = null
boolean USE_SELECTION = true
int TIMEOUT_MINUTES = 60

// >>> ZEUS keep-edits rule (mirror of bridge/edits.py; keep both scripts and the Python module in sync)
def ZEUS_NAME_PREFIX = 'ZEUS'
def MEAS_AREA_PX = 'ZEUS area px^2'
def MEAS_VERTICES = 'ZEUS vertex count'
def MEAS_CENTROID_X = 'ZEUS centroid x'
def MEAS_CENTROID_Y = 'ZEUS centroid y'
double AREA_REL_TOL = 1e-6
double AREA_ABS_TOL_PX2 = 0.5
double CENTROID_TOL_PX = 0.5

def zeusClassFromName = { name ->
    String marker = ZEUS_NAME_PREFIX + ' '
    if (name == null || !name.toString().startsWith(marker))
        return null
    return name.toString().substring(marker.length())
}

def isUntouchedZeus = { o ->
    if (o == null || !o.isAnnotation() || o.getROI() == null)
        return false
    def zeusClass = zeusClassFromName(o.getName())
    if (zeusClass == null)
        return false
    def pathClass = o.getPathClass()
    String className = pathClass == null ? null : pathClass.toString()
    if (className != zeusClass)
        return false
    def ml = o.getMeasurementList()
    if (!ml.containsKey(MEAS_AREA_PX) || !ml.containsKey(MEAS_VERTICES))
        return false
    double written = ml.get(MEAS_AREA_PX)
    double area = o.getROI().getArea()
    if (Double.isNaN(written) || Math.abs(area - written) > Math.max(AREA_REL_TOL * Math.abs(written), AREA_ABS_TOL_PX2))
        return false
    def geometry = o.getROI().getGeometry()
    long vertices = geometry.getNumPoints()
    if (vertices != Math.round(ml.get(MEAS_VERTICES)))
        return false
    // centroid (JTS, as shapely computes it): checked when written; older ZEUS output has none
    boolean hasX = ml.containsKey(MEAS_CENTROID_X)
    boolean hasY = ml.containsKey(MEAS_CENTROID_Y)
    if (!hasX && !hasY)
        return true
    if (!hasX || !hasY)
        return false
    def centroid = geometry.getCentroid()
    if (centroid.isEmpty())
        return false
    double dist = Math.hypot(centroid.getX() - ml.get(MEAS_CENTROID_X), centroid.getY() - ml.get(MEAS_CENTROID_Y))
    return dist <= CENTROID_TOL_PX
}

def stampZeusMeasurements = { o ->
    if (o.getROI() == null || zeusClassFromName(o.getName()) == null)
        return
    def ml = o.getMeasurementList()
    ml.put(MEAS_AREA_PX, o.getROI().getArea())
    def geometry = o.getROI().getGeometry()
    ml.put(MEAS_VERTICES, (double) geometry.getNumPoints())
    def centroid = geometry.getCentroid()
    if (!centroid.isEmpty()) {
        ml.put(MEAS_CENTROID_X, centroid.getX())
        ml.put(MEAS_CENTROID_Y, centroid.getY())
    }
    ml.close()
}
// <<< ZEUS keep-edits rule

// ------------------------------------------------------------------------------------ messages
def scriptClassLoader = this.getClass().getClassLoader()
def showMessage = { String text, boolean isError ->
    println((isError ? 'ZEUS error: ' : 'ZEUS: ') + text)
    for (String className : ['qupath.fx.dialogs.Dialogs', 'qupath.lib.gui.dialogs.Dialogs']) {
        try {
            def dialogs = Class.forName(className, true, scriptClassLoader)
            if (isError)
                dialogs.showErrorMessage('ZEUS', text)
            else
                dialogs.showPlainMessage('ZEUS', text)
            return
        } catch (ClassNotFoundException ignored) {
            // try the next location of the Dialogs class (it moved in QuPath 0.5)
        } catch (Throwable ignored) {
            return // no GUI (e.g. command line): the message was printed
        }
    }
}

// ------------------------------------------------------------------------------------ the request
def imageData = getCurrentImageData()
if (imageData == null) {
    showMessage('Open an image first.', true)
    return
}
def server = imageData.getServer()
def uris = server.getURIs()
if (uris.isEmpty()) {
    showMessage('The current image has no file that the ZEUS service could read.', true)
    return
}
def uri = uris.iterator().next()
String slide = 'file'.equalsIgnoreCase(uri.getScheme()) ? Paths.get(uri).toString() : uri.toString()

def request = new JsonObject()
request.addProperty('slide', slide)
PathObject selected = getSelectedObject()
def regionGeometry = null
if (USE_SELECTION && selected != null && selected.isAnnotation() && selected.getROI() != null && selected.getROI().isArea()) {
    request.add('region', GsonTools.getInstance().toJsonTree(selected.getROI()))
    regionGeometry = selected.getROI().getGeometry()
}
if (MODEL)
    request.addProperty('model', MODEL)
if (PROMPTS)
    request.addProperty('prompts', PROMPTS)
if (THRESHOLD != null)
    request.addProperty('threshold', THRESHOLD)

String token = TOKEN ? TOKEN : System.getenv('ZEUS_TOKEN')
def client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build()
def builder = HttpRequest.newBuilder(URI.create(SERVICE_URL))
        .timeout(Duration.ofMinutes(TIMEOUT_MINUTES))
        .header('Content-Type', 'application/json')
        .POST(HttpRequest.BodyPublishers.ofString(request.toString(), StandardCharsets.UTF_8))
if (token)
    builder.header('Authorization', 'Bearer ' + token)

println "ZEUS: segmenting ${slide}${regionGeometry == null ? '' : ' (selected region)'} ..."
HttpResponse<String> response
try {
    response = client.send(builder.build(), HttpResponse.BodyHandlers.ofString(StandardCharsets.UTF_8))
} catch (ConnectException e) {
    showMessage("The ZEUS service is not running at ${SERVICE_URL}.\nStart it on this computer with: zeus serve", true)
    return
} catch (HttpTimeoutException e) {
    showMessage("The ZEUS service did not answer within ${TIMEOUT_MINUTES} minutes.", true)
    return
} catch (IOException e) {
    showMessage("Cannot reach the ZEUS service at ${SERVICE_URL}: ${e.getMessage()}", true)
    return
}

String body = response.body()
def answer = null
try {
    answer = JsonParser.parseString(body)
} catch (Exception ignored) {
    // not JSON: reported below
}
String error = null
if (answer != null && answer.isJsonObject() && answer.getAsJsonObject().has('error'))
    error = answer.getAsJsonObject().get('error').getAsString()
if (response.statusCode() != 200 || error != null || answer == null || answer.isJsonNull()) {
    if (error == null)
        error = body.length() > 300 ? body.substring(0, 300) + '...' : body
    String hint = ''
    if (response.statusCode() == 401)
        hint = '\n(Set TOKEN in this script or the environment variable ZEUS_TOKEN to the token zeus serve printed.)'
    else if (response.statusCode() == 403)
        hint = '\n(The service may only read slides under its folders: start it with zeus serve --root <folder of this slide>.)'
    showMessage("The ZEUS service answered with an error (HTTP ${response.statusCode()}):\n${error}${hint}", true)
    return
}

List<PathObject> incoming
try {
    incoming = PathIO.readObjectsFromGeoJSON(new ByteArrayInputStream(body.getBytes(StandardCharsets.UTF_8)))
} catch (Exception e) {
    showMessage("The ZEUS service answered with something that is not QuPath GeoJSON: ${e.getMessage()}", true)
    return
}

// ------------------------------------------------------------------------------------ keep edits, add
def hierarchy = imageData.getHierarchy()
def toRemove = hierarchy.getAnnotationObjects().findAll {
    it != selected && isUntouchedZeus(it) && (regionGeometry == null || regionGeometry.covers(it.getROI().getGeometry()))
}
def removeSet = new HashSet<PathObject>(toRemove)
def keptIds = new HashSet()
for (PathObject o : hierarchy.getAllObjects(false)) {
    if (!removeSet.contains(o))
        keptIds.add(o.getID())
}
def toAdd = incoming.findAll { !keptIds.contains(it.getID()) }
toAdd.each { stampZeusMeasurements(it) }
hierarchy.removeObjects(toRemove, true)
hierarchy.addObjects(toAdd)
fireHierarchyUpdate(hierarchy)

String summary = "Added ${toAdd.size()} ZEUS annotation(s), replaced ${toRemove.size()} untouched one(s); " +
        'edited and hand-drawn objects were kept.'
println 'ZEUS: ' + summary
if (toAdd.isEmpty())
    showMessage('The ZEUS service found no tumor regions in this image' + (regionGeometry == null ? '.' : ' region.'), false)
