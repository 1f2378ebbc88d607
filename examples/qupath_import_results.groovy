/**
 * Import histotile predictions into every image of the open QuPath project (QuPath 0.5 / 0.6).
 *
 * For each project image "<name>.<ext>" the script looks for
 *     <results>/<name>/tiles.geojson.gz     (or tiles.geojson)
 *     <results>/<name>/classes.geojson.gz   (optional, from `--qupath-merge`)
 * written by `histotile predict` (or `histotile export qupath`), adds the objects to the image
 * and saves it. Tiles carry prob_<class> measurements and the argmax classification.
 * Feature ids are deterministic, so running the script twice does not duplicate objects.
 * At the end it opens the first image with results and Measure > Show measurement maps:
 * choose a prob_<class> measurement there to see the heatmap.
 *
 * Use: Automate > Script editor > File > Open... this file > Run (not "Run for project":
 * the script loops over the project itself). Set RESULTS below, or leave it empty to be asked.
 */
import qupath.lib.common.GeneralTools
import qupath.lib.io.PathIO

import java.nio.file.Files
import java.nio.file.Path

String RESULTS = ""   // e.g. "/data/histotile-out"; empty: choose the folder in a dialog

def qupath = getQuPath()
def project = getProject()
if (project == null) {
    print "Open a project first (File > Project > Open project)"
    return
}

File resultsDir = RESULTS ? new File(RESULTS) : chooseDirectory()
if (resultsDir == null || !resultsDir.isDirectory()) {
    print "No results folder chosen"
    return
}

/** QuPath 0.5+ has FileChoosers; older versions Dialogs. */
File chooseDirectory() {
    try {
        return Class.forName("qupath.fx.dialogs.FileChoosers")
                .promptForDirectory("histotile results folder", null)
    } catch (ClassNotFoundException ignored) {
        return Class.forName("qupath.lib.gui.dialogs.Dialogs").promptForDirectory(null)
    }
}

/** The result folder of an image: histotile names it after the slide file's stem. */
Path findResultFolder(File resultsDir, String imageName) {
    def candidates = [
        imageName.contains(".") ? imageName.substring(0, imageName.lastIndexOf(".")) : imageName,
        GeneralTools.getNameWithoutExtension(imageName),             // slide.ome.tif -> slide
        imageName.contains(".") ? imageName.substring(0, imageName.indexOf(".")) : imageName,
        imageName.split(" - ")[0],                                   // "file.vsi - series"
    ].unique()
    for (String stem : candidates) {
        def dir = resultsDir.toPath().resolve(stem)
        if (Files.isDirectory(dir))
            return dir
    }
    return null
}

List readIfExists(Path dir, String... names) {
    for (String name : names) {
        def file = dir.resolve(name)
        if (Files.exists(file))
            return PathIO.readObjects(file)
    }
    return []
}

def current = getCurrentImageData()
def currentEntry = current == null ? null : project.getEntry(current)
def firstWithResults = null
int images = 0, objects = 0

for (def entry : project.getImageList()) {
    def dir = findResultFolder(resultsDir, entry.getImageName())
    if (dir == null) {
        print "No results for ${entry.getImageName()}"
        continue
    }
    def newObjects = readIfExists(dir, "tiles.geojson.gz", "tiles.geojson") +
            readIfExists(dir, "classes.geojson.gz", "classes.geojson")
    boolean isOpen = currentEntry != null && entry == currentEntry
    def imageData = isOpen ? current : entry.readImageData()
    def hierarchy = imageData.getHierarchy()
    def known = hierarchy.getAllObjects(false).collect { it.getID() } as Set
    def toAdd = newObjects.findAll { !known.contains(it.getID()) }
    hierarchy.addObjects(toAdd)
    if (!isOpen)
        entry.saveImageData(imageData)
    images++
    objects += toAdd.size()
    firstWithResults = firstWithResults ?: entry
    print "${entry.getImageName()}: ${toAdd.size()} objects added from ${dir}"
}
print "Imported ${objects} objects into ${images} images"

if (qupath != null && firstWithResults != null) {
    javafx.application.Platform.runLater {
        if (currentEntry == null)
            qupath.openImageEntry(firstWithResults)
        def action = qupath.lookupActionByText("Show measurement maps")
        try {
            action.handle(null)
        } catch (Exception ignored) {
            print "Open Measure > Show measurement maps and pick a prob_<class> measurement"
        }
    }
}
